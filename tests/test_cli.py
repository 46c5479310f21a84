"""A user's mistakes on the command line: one line `error: ...`, exit status 2, no
traceback (jdiff.cli.run); tracebacks are for bugs."""

import os
import re

import pytest

import helpers
import xla_env

TEST = "--config=configs/mmdit_256.py:test"


CASES = [
    # (command, expected fragment of the one line); WORK stands for the finished run
    (["jdiff.main", TEST, "--workdir=WORK2", "--config.train.num_stepz=5"],
     '--config.train.num_stepz: no such config field (did you mean "num_steps"'),
    (["jdiff.main", TEST, "--workdir=WORK2", "--config.train.batch_size=-4"], "config.train.batch_size=-4 must be > 0"),
    (["jdiff.main", "--config=configs/nope.py", "--workdir=WORK2"],
     "cannot load config file configs/nope.py: [Errno 2] No such file or directory"),
    (["jdiff.main", "--config=configs/mmdit_256.py:nosuch", "--workdir=WORK2"], "unknown variant 'nosuch'"),
    (["jdiff.main", TEST, "--workdir=WORK2", "--config.mesh.data=8"], "needs 8 devices, have 1"),
    (["jdiff.main", TEST, "--workdir=WORK2", "--config.model.attention=cudnn"], "needs an NVIDIA GPU"),
    (["jdiff.main", TEST, "--workdir=WORK2", "--config.data.resolution=17"], "not divisible by model.patch_size=4"),
    (["jdiff.main", TEST, "--workdir=WORK2", "--config.data.source=webdataset",
      "--config.data.path=/no/shard-{0..1}.tar"],
     "data.path: nothing at '/no/shard-0.tar' (from '/no/shard-{0..1}.tar')"),
    (["jdiff.sample", "--workdir=NOWHERE", "--prompt=x"], "is 'NOWHERE' a jdiff workdir?"),
    (["jdiff.sample", "--workdir=WORK", "--prompt=x", "--step=1234"], "no checkpoint at step 1234 in WORK/checkpoints (steps: 4, 2)"),
    (["jdiff.sample", "--workdir=WORK", "--prompt=x", "--num_images=0"], "--num_images=0: 0 is not a positive integer"),
    (["jdiff.sample", "--workdir=WORK", "--prompt=x", "--num_steps=0"], "--num_steps=0: 0 is not a positive integer"),
    (["jdiff.sample", "--workdir=WORK", "--prompt=x", "--height=15"], "height and width must be positive multiples of the "
     "patch size 4"),
    (["jdiff.sample", "--workdir=WORK", "--prompt=x", "--width=64"], "is 16 patches long; the model's position table"),
    (["jdiff.evaluate", "--workdir=WORK", "--num_samples=0"], "--num_samples=0: 0 is not a positive integer"),
    (["jdiff.evaluate", "--workdir=WORK", "--metrics=fid"], "--metrics=fid needs --fid_stats"),
    (["jdiff.evaluate", "--workdir=WORK", "--metrics=adherence,fdi"], "unknown --metrics ['fdi']"),
    (["jdiff.evaluate", "--workdir=WORK", "--metrics=clip_score"], "--metrics=clip_score needs --clip_model"),
    (["jdiff.evaluate", "--workdir=WORK", "--height=8"], "--height/--width size the images of fid, kid and clip_score"),
    (["jdiff.evaluate", "--workdir=WORK", "--metrics=clip_score", "--clip_model=NOWHERE"],
     "no CLIP model directory at 'NOWHERE'"),
    (["jdiff.evaluate", "--workdir=WORK", "--metrics=clip_score", "--clip_model=NOWHERE", "--grids=G"],
     "--grids draws the shapes benchmark's images: add adherence to --metrics"),
    (["jdiff.stages", "--config=configs/stages.py:test", "--workdir=WORK2", "--config.nope=1"],
     "--config.nope: no such config field"),
    (["jdiff.stages", "--config=configs/stages.py:test", "--workdir=WORK2", "--seeds=0,x"],
     "--seeds=0,x: give integers"),
]


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(a[:1] + a[2:])[:60] for a, _ in CASES])
def test_user_error_is_one_line_with_status_2(tiny_run, tmp_path, args, expected):
  where = dict(WORK=tiny_run, WORK2=str(tmp_path / "w2"), NOWHERE=str(tmp_path / "nowhere"))
  # WORK2 before WORK: a prefix match would send every WORK2 case to one shared workdir
  fill = lambda text: re.sub(r"\b(WORK2|WORK|NOWHERE)\b", lambda m: where[m.group(1)], text)
  proc = helpers.cli(*[fill(a) for a in args], check=False)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(errors) == 1 and fill(expected) in errors[0], proc.stderr[-3000:]
  assert not os.path.exists(tmp_path / "w2" / "config.json")  # a failed start leaves no trace


def test_sample_at_another_shape_viewable_and_without_stale_files(tiny_run, tmp_path):
  """--height/--width: any shape the model's patches and position table cover (the test model
  trained at 16x16); images enlarged to a short side of 256 unless --upscale says otherwise;
  a second run into the same folder leaves none of the first run's images."""
  import json

  from PIL import Image

  (tmp_path / "notes.txt").write_text("mine")
  first = helpers.cli("jdiff.sample", f"--workdir={tiny_run}", "--prompt=a red circle", "--num_steps=2", "--height=8",
                      "--width=32", "--num_images=2", "--upscale=1", f"--out={tmp_path}")
  paths = json.loads(first.stdout.strip().splitlines()[-1])["images"]
  with Image.open(paths[1]) as image:
    assert (image.height, image.width) == (8, 32)
  helpers.cli("jdiff.sample", f"--workdir={tiny_run}", "--prompt=a blue square", "--num_steps=2", f"--out={tmp_path}")
  assert sorted(os.listdir(tmp_path)) == ["0000.png", "grid.png", "notes.txt", "prompts.txt"]
  assert (tmp_path / "prompts.txt").read_text() == "0000: a blue square\n"
  with Image.open(tmp_path / "0000.png") as image:
    assert (image.height, image.width) == (256, 256)  # 16x16, enlarged 16 times


def test_a_long_prompt_is_cut_with_a_warning(tiny_run, tmp_path):
  prompt = "a large red circle " * 10  # 190 bytes; the test config's text.max_len is smaller
  proc = helpers.cli("jdiff.sample", f"--workdir={tiny_run}", f"--prompt={prompt}", "--num_steps=1",
                     f"--out={tmp_path}")
  assert "longer than the text encoder reads (text.max_len=" in proc.stderr and "it is cut to" in proc.stderr


def test_sigterm_saves_and_exits_with_the_resumable_status(tmp_path):
  """SIGTERM (a scheduler's preemption) during training: the checkpoint of the step reached
  is saved, the summary printed, and the exit status is 75, which says 'run me again'."""
  import json
  import signal
  import subprocess
  import sys
  import time

  from jdiff.workdir import checkpoint as ckpt_lib

  work = tmp_path / "w"
  proc = subprocess.Popen([sys.executable, "-m", "jdiff.main", TEST, f"--workdir={work}",
                           "--config.train.num_steps=100000", "--config.train.log_every=1",
                           "--config.train.checkpoint_every=100000", "--config.train.sample_every=0"],
                          cwd=helpers.ROOT, env=xla_env.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (work / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["stopped_by"] == "signal 15" and summary["step"] > 0
  assert ckpt_lib.Checkpoints(str(work), read_only=True).latest_step() == summary["step"]


def test_ctrl_c_before_training_exits_130_without_a_traceback(tmp_path):
  """SIGINT while the run starts up (here: once it logged that it starts from scratch, i.e.
  during compilation): one word, status 130, the workdir lock released, no crash."""
  import signal
  import subprocess
  import sys
  import time

  # The test runner may start children with SIGINT ignored (a background job); restore it.
  wrap = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "sys.argv = ['jdiff.main'] + sys.argv[1:]; runpy.run_module('jdiff.main', run_name='__main__')")
  work = tmp_path / "w"
  with open(tmp_path / "stderr", "w") as err_file:
    proc = subprocess.Popen([sys.executable, "-c", wrap, TEST, f"--workdir={work}", "--config.train.num_steps=100000",
                             "-v", "0"], cwd=helpers.ROOT, env=xla_env.env(),
                            stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    deadline = time.time() + 300
    while "starting from scratch" not in open(tmp_path / "stderr").read() and time.time() < deadline:
      assert proc.poll() is None
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
  err = open(tmp_path / "stderr").read()
  assert proc.returncode == 130, err[-3000:]
  assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err[-3000:]
  assert not os.path.exists(work / "jdiff.lock")


def test_help_exits_0_on_every_command(monkeypatch, capsys):
  """absl's --help exits with 1 after printing the usage; cli.run, which every `python -m
  jdiff.X` command runs through, makes it 0."""
  import glob
  import sys

  from absl import flags

  from jdiff import cli

  main_blocks = {}  # module path -> the code under its `if __name__ == "__main__":`
  for path in glob.glob(os.path.join(helpers.ROOT, "jdiff", "**", "*.py"), recursive=True):
    parts = open(path).read().split('if __name__ == "__main__":')
    if len(parts) == 2:
      main_blocks[path] = parts[1]
  assert len(main_blocks) >= 12
  for path, block in main_blocks.items():
    assert "cli.run(main)" in block and os.path.dirname(path) == os.path.join(helpers.ROOT, "jdiff"), path
  for flag in cli.HELP_FLAGS:
    monkeypatch.setattr(sys, "argv", ["jdiff.x", flag])
    try:
      with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: pytest.fail("main ran"))
    finally:
      flags.FLAGS.unparse_flags()
    assert e.value.code == 0 and "helpfull" in capsys.readouterr().out, flag


def test_every_module_is_in_a_layer_and_every_command_is_thin():
  """pyproject's layers contract names every top-level module and package of jdiff (one
  missing would be checked by no contract), and a command (jdiff/<name>.py with a
  `__main__` block) holds flags and its main only: no other function or class."""
  import ast
  import pkgutil
  import re
  import tomllib

  import jdiff

  with open(os.path.join(helpers.ROOT, "pyproject.toml"), "rb") as f:
    layers = tomllib.load(f)["tool"]["importlinter"]["contracts"][0]["layers"]
  named = {n.strip() for layer in layers for n in re.split(r"[|:]", layer)}
  assert named == {"jdiff." + m.name for m in pkgutil.iter_modules(jdiff.__path__)}
  commands = [m.name for m in pkgutil.iter_modules(jdiff.__path__) if not m.ispkg and 'if __name__ == "__main__":' in
              open(os.path.join(helpers.ROOT, "jdiff", m.name + ".py")).read()]
  assert set(layers[0].replace(" ", "").replace("jdiff.", "").split("|")) == set(commands)
  for name in commands:
    tree = ast.parse(open(os.path.join(helpers.ROOT, "jdiff", name + ".py")).read())
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs == ["main"] or name == "convert" and defs == ["_summary", "main"], (name, defs)
