"""`jaxllm reproduce`: expected against obtained figures, from a finished run or a new one."""

import json
import pathlib

import pytest

from jaxllm import cli
from jaxllm.errors import JaxllmError
from jaxllm.tools import reproduce

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = {"val_loss": ("<=", 1.88, "nanoGPT README"), "steps": ("==", 30),
            "initial_val_loss": ("between", 4.0, 4.3, "ln 65 = 4.17"),
            "test_accuracy": (">=", 0.9)}


def test_rows_say_pass_fail_and_missing():
  rows = reproduce.compare(EXPECTED, {"val_loss": 1.9058, "steps": 30,
                                      "initial_val_loss": 4.1992})
  assert [(r.figure, r.check, r.obtained, r.passed, r.source) for r in rows] == [
      ("val_loss", "<= 1.88", 1.9058, False, "nanoGPT README"),
      ("steps", "== 30", 30, True, ""),
      ("initial_val_loss", "between 4 and 4.3", 4.1992, True, "ln 65 = 4.17"),
      ("test_accuracy", ">= 0.9", None, False, "")]
  text = reproduce.markdown("t", rows)
  assert "| `val_loss` | <= 1.88 | 1.9058 | **FAIL** | nanoGPT README |" in text
  assert "| `test_accuracy` | >= 0.9 | missing | **FAIL** |  |" in text
  assert text.endswith("2 of 4 pass.\n")
  with pytest.raises(JaxllmError, match=r"EXPECTED\['x'\].*check one of"):
    reproduce.compare({"x": ("~", 1.0)}, {})


def test_reproduce_trains_then_reads_the_finished_run(tmp_path, shared_data, capsys):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(
      "from jaxllm.config import load_config\n"
      "EXPECTED = {'initial_val_loss': ('between', 3.5, 4.5, 'ln(vocab) untrained'),\n"
      "            'val_loss': ('<', 4.0, 'below ln(vocab) after 30 steps'),\n"
      "            'steps': ('==', 30)}\n"
      "def get_config():\n"
      f"  c = load_config({str(REPO / 'experiments' / 'shakespeare_char.py')!r})\n"
      "  c.model.preset = 'gpt-micro'\n  c.data.dataset = 'text'\n  c.data.tokenizer = 'char'\n"
      "  c.data.train_split = 'train'\n  c.data.val_split = ''\n"
      f"  c.data.path = {str(shared_data / 'the-verdict.txt')!r}\n"
      "  c.train.steps = 30\n  c.train.eval_every = 15\n  c.train.batch_size = 4\n"
      "  c.train.eval_batches = 2\n  c.train.peak_flops = 1e11\n  c.train.sample_tokens = 5\n"
      "  return c\n")
  workdir = tmp_path / "run"
  args = ["reproduce", str(experiment), "--workdir", str(workdir), "--no-progress"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "| `steps` | == 30 | 30 | pass |  |" in out and "3 of 3 pass." in out
  assert (workdir / "reproduce.md").read_text().startswith("## tiny.py: ")
  # Again: read back, not retrained; a stricter bound fails with status 1.
  figures = json.loads((workdir / "eval.json").read_text())
  experiment.write_text(experiment.read_text().replace("('<', 4.0,", "('<', 0.1,"))
  assert cli.main(args) == 1
  out = capsys.readouterr().out
  assert "reading the finished run" in out
  assert f"| `val_loss` | < 0.1 | {figures['val_loss']:.6g} | **FAIL** |" in out
  # Other settings are another run: trained again from scratch, its figures reported.
  assert cli.main([*args, "--config.train.steps=31"]) == 1
  out = capsys.readouterr().out
  assert ("training " + str(workdir) + " again from scratch: it was made with other settings: "
          "train.steps=31 (was 30)") in out
  assert "| `steps` | == 30 | 31 | **FAIL** |" in out
  assert json.loads((workdir / "eval.json").read_text())["steps"] == 31
  assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text(
      ).splitlines()][0] == 0  # not resumed from the 30-step run's checkpoint


def test_all_cpu_experiments_in_dependency_order(tmp_path, shared_data, capsys):
  # Three experiments: "b" starts from "a"'s run (REQUIRES), "c" is not CPU-sized.
  folder = tmp_path / "experiments"
  folder.mkdir()
  base = (
      "from jaxllm.config import load_config\n"
      "def get_config():\n"
      f"  c = load_config({str(REPO / 'experiments' / 'shakespeare_char.py')!r})\n"
      "  c.model.preset = 'gpt-micro'\n  c.data.dataset = 'text'\n  c.data.tokenizer = 'char'\n"
      "  c.data.train_split = 'train'\n  c.data.val_split = ''\n"
      "  c.train.steps = 30\n  c.train.eval_every = 30\n  c.train.batch_size = 4\n"
      "  c.train.eval_batches = 2\n  c.train.peak_flops = 1e11\n  c.train.sample_tokens = 5\n"
      "  c.train.init_from = INIT\n  return c\n")
  runs = tmp_path / "runs"
  (folder / "b.py").write_text(
      f"CPU = True\nDATA = 'the-verdict.txt'\nREQUIRES = ('a',)\nINIT = {str(runs / 'a')!r}\n"
      "EXPECTED = {'initial_val_loss': ('<', 4.0, 'starts where a ended')}\n" + base)
  (folder / "a.py").write_text(
      "CPU = True\nDATA = 'the-verdict.txt'\nINIT = ''\n"
      "EXPECTED = {'initial_val_loss': ('>', 4.0, 'ln(vocab) untrained')}\n" + base)
  (folder / "c.py").write_text(
      "DATA = 'the-verdict.txt'\nINIT = ''\nEXPECTED = {'steps': ('==', 1)}\n" + base)
  assert cli.main(["reproduce", "--all", "--cpu", "--experiments", str(folder), "--data-dir",
                   str(shared_data), "--workdir", str(runs), "--no-progress"]) == 0
  report = (runs / "reproduce.md").read_text()
  assert report.index("## a.py") < report.index("## b.py") and "## c.py" not in report
  assert report.endswith("2 of 2 experiments reproduce.\n")
  assert not (runs / "c").exists()
  capsys.readouterr()
  # Without --cpu, c runs too (and fails its row): exit status 1, named in the summary.
  assert cli.main(["reproduce", "--all", "--experiments", str(folder), "--data-dir",
                   str(shared_data), "--workdir", str(runs), "--no-progress"]) == 1
  assert "2 of 3 experiments reproduce; failing: c." in (runs / "reproduce.md").read_text()


def test_seeds_check_the_mean_and_report_the_spread(tmp_path, shared_data, capsys):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(
      "from jaxllm.config import load_config\n"
      "EXPECTED = {'val_loss': ('<', 4.5, 'below ln(vocab)'), 'steps': ('==', 10)}\n"
      "def get_config():\n"
      f"  c = load_config({str(REPO / 'experiments' / 'shakespeare_char.py')!r})\n"
      "  c.model.preset = 'gpt-micro'\n  c.data.dataset = 'text'\n  c.data.tokenizer = 'char'\n"
      "  c.data.train_split = 'train'\n  c.data.val_split = ''\n"
      f"  c.data.path = {str(shared_data / 'the-verdict.txt')!r}\n"
      "  c.train.steps = 10\n  c.train.eval_every = 10\n  c.train.batch_size = 4\n"
      "  c.train.eval_batches = 2\n  c.train.peak_flops = 1e11\n  c.train.sample_tokens = 5\n"
      "  return c\n")
  workdir = tmp_path / "runs"
  argv = ["reproduce", str(experiment), "--workdir", str(workdir), "--seeds", "3,4",
          "--no-progress"]
  assert cli.main(argv) == 0
  losses = [json.loads((workdir / f"seed-{s}" / "eval.json").read_text())["val_loss"]
            for s in (3, 4)]
  assert losses[0] != losses[1]  # the seed reached each run
  assert json.loads((workdir / "seed-4" / "request.json").read_text())["train"]["seed"] == 4
  table = json.loads((workdir / "seeds.json").read_text())["figures"]
  assert table["val_loss"]["values"] == losses
  assert table["val_loss"]["mean"] == pytest.approx((losses[0] + losses[1]) / 2, abs=1e-12)
  assert table["val_loss"]["std"] == pytest.approx(abs(losses[0] - losses[1]) / 2 ** 0.5,
                                                   abs=1e-12)
  assert table["steps"] == {"mean": 10, "std": 0, "min": 10, "max": 10, "values": [10, 10]}
  report = (workdir / "reproduce.md").read_text()
  assert f"| `val_loss` | < 4.5 | {table['val_loss']['mean']:.6g} | pass |" in report
  assert "| figure | mean | std | min | max | seed 3 | seed 4 |" in report
  capsys.readouterr()
  assert cli.main([*argv[:-3], "--seeds", "3,x"]) == 2
  assert "--seeds takes integers" in capsys.readouterr().err
  assert cli.main([*argv, "--config.train.seed=1"]) == 2
  assert "leave out --config.train.seed" in capsys.readouterr().err
