"""Runs the trainer's command line (`flowgrpo_jax.train.cli`, what `python -m flowgrpo_jax.train`
calls) once per argument list, in this one process, so a test checks many failing commands for
the price of one interpreter start:

    python tests/cli_driver.py '[["--config", "configs/x.py", ...], ...]'

prints a JSON list of [exit status, everything printed] per command; a command that ends in an
exception other than SystemExit gets status "traceback" and its traceback as output."""
import contextlib
import io
import json
import sys
import traceback

from flowgrpo_jax import train


def run(args: list) -> tuple:
    train.FLAGS.unparse_flags()
    for name in list(train.FLAGS):  # the last command's --config.KEY overrides; parsing
        if name.startswith("config."):  # the config flag defines those of this one
            delattr(train.FLAGS, name)
    sys.argv = ["flowgrpo_jax.train", *args]  # the config flag reads its overrides from here
    output = io.StringIO()
    with contextlib.redirect_stderr(output), contextlib.redirect_stdout(output):
        try:
            train.cli()
            status = 0
        except SystemExit as e:
            status = e.code
        except BaseException:
            status = "traceback"
            output.write(traceback.format_exc())
    return status, output.getvalue()


if __name__ == "__main__":
    print(json.dumps([run(args) for args in json.loads(sys.argv[1])]))
