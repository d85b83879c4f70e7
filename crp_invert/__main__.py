"""``python -m crp_invert``: the same as the ``crp-invert`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="crp-invert")
