"""The quickstart tour runs, its merges are exact and the NNX part trains."""


def test_quickstart_runs_both_tours(capsys):
    from experiments import quickstart

    quickstart.main()
    out = capsys.readouterr().out
    assert "frozen base unchanged: True" in out and "accuracy 1.000" in out
    assert "nnx: merged layers are Linear; accuracy 1.000" in out
    gaps = [float(line.rsplit("= ", 1)[1]) for line in out.splitlines() if "max |merged - unmerged|" in line]
    assert len(gaps) == 2 and max(gaps) < 1e-4
