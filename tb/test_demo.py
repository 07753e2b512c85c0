"""`acceltcp demo` (the main job) runs end to end and reports agreement everywhere."""
from sim.cli import main


def test_demo_small_mix(capsys):
    status = main(["demo", "--frames", "16", "--seed", "3"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "records matching the reference model: 16/16" in out
    assert "frames passed through unchanged: yes" in out
    assert "RX parser" in out and "TX builder" in out and "TX checksum inserter" in out
