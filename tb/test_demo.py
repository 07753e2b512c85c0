"""`acceltcp demo` (the main job) runs end to end and reports agreement everywhere."""
from sim.cli import main


def test_demo_small_mix(capsys):
    # The host-driver phase runs in the Verilator demo below (minutes on this simulator).
    status = main(["demo", "--frames", "16", "--seed", "3", "--no-host"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "records matching the reference model: 16/16" in out
    assert "frames passed through unchanged: yes" in out
    assert "RX parser" in out and "TX builder" in out and "TX checksum inserter" in out
    assert "8 of 8 clients established" in out
    assert "forged final ACKs: 200, accepted: 0" in out
    assert "SPLICE OK, ended NORMAL" in out and "host DMA bytes 0" in out
    assert "host work per transaction" not in out


def test_demo_on_verilator(capsys):
    """The same demo through cocotb and Verilator (reuses the testbenches' builds)."""
    import pytest
    from tb.harness import simulators
    if "verilator" not in simulators():
        pytest.skip("SIM does not include verilator")
    status = main(["demo", "--sim", "verilator", "--frames", "40", "--seed", "5"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "records matching the reference model: 40/40" in out
    assert "host work per transaction" in out and "kv: no offload" in out
