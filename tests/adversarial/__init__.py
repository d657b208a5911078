"""Bad-input and hostile-user tests: what another local user or a damaged file can make root do."""
