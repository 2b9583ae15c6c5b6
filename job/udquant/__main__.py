from udquant.cli import entry

entry()
