"""pytest configuration: every test with a ``sim`` argument runs once per simulator in $SIM."""
from tb.harness import simulators


def pytest_generate_tests(metafunc):
    if "sim" in metafunc.fixturenames:
        metafunc.parametrize("sim", simulators())
