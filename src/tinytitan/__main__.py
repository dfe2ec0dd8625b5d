from tinytitan.cli.main import entry

entry()
