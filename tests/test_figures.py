from cambackdoor.figures import tradeoff_plot


def test_tradeoff_plot_takes_two_rows_with_the_same_x(tmp_path):
    rows = [{"recipe": "default", "lambda": 0.5, "asr": 0.9, "clean_acc": 0.85},
            {"recipe": "default", "lambda": 0.5, "asr": 0.8, "clean_acc": 0.84},  # e.g. two seeds
            {"recipe": "default", "lambda": 1.0, "asr": 1.0, "clean_acc": 0.83}]
    path = tradeoff_plot(rows, "lambda", tmp_path / "t.png", xlabel="lambda", report_points=True)
    assert path.stat().st_size > 1000
