from scatlas.cli import app

app()
