from flexmoe.cli import entry

entry()
