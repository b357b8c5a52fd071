from ckptview.cli import run

run()
