pytest_plugins = ["fixtures.registry"]
