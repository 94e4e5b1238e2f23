from quantdiag.cli import app

app()
