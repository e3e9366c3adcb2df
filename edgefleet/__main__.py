from edgefleet.cli import app

app(prog_name="edgefleet")
