"""The generated tables in docs/ match the declarations in hw/."""
from sim.docs import main


def test_docs_up_to_date():
    assert main(["--check"]) == 0, "run `python -m sim.docs` to regenerate docs/"
