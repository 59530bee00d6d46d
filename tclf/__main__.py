"""``python -m tclf``: the ``tclf`` command."""

from tclf.cli import main

main(prog_name="tclf")
