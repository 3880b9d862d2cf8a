"""The command line: `jem generate` and the elastic demo (spmd mode, tiny preset) end to end."""
from jax_elastic_moe.cli import main


def test_generate(capsys, tmp_path):
    out = tmp_path / "gen.json"
    assert main(["generate", "--config", "tiny", "--ranks", "2", "--redundant", "0", "--num-prompts", "3",
                 "--max-new-tokens", "4", "--quiet", "--json", str(out)]) == 0
    assert "3 prompts, 12 tokens" in capsys.readouterr().out
    assert out.exists()


def test_demo_spmd_recovers_with_identical_tokens(capsys):
    rc = main(["demo", "--mode", "spmd", "--config", "tiny", "--ranks", "4", "--redundant", "4", "--kill", "1",
               "--at-step", "3", "--num-prompts", "4", "--max-new-tokens", "8", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "failed ranks [1]" in text and "tokens identical to the run with no failure: True" in text
