"""The trainer's command line.

    python -m spo_jax.train --config=<preset>[:arg] [--config.a.b=value ...]
    python -m spo_jax.train --config=path/to/config.py[:arg] [--config.a.b=value ...]
    python -m spo_jax.train --config=<run_dir>/config.json     # rerun / resume that run

Presets (shipped with the package, spo_jax/configs/):
{presets}

Loads the ml_collections config file (a preset name resolved to its module first), turns on JAX's persistent compilation cache
(``config.compile_cache``; see ``spo_jax.compile_cache``), runs ``spo_jax.train.train``
(which validates the config before anything heavy starts) and prints a JSON summary of
the run on process 0, with ``compile``: the XLA programs the run built, how many were
compiled and how many loaded from the cache.

Every expected failure (config, data, model path, checkpoint, divergence, file system,
interrupt) prints one line and exits with its code (``EXIT_CODES``); ``--debug`` or
``SPO_JAX_DEBUG=1`` shows the traceback. The console shows spo_jax's INFO records and the
progress bar; libraries (Orbax, JAX, datasets) only warn unless ``--verbosity=1``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import sys
import threading

import datasets
import jax
from absl import app, flags
from ml_collections import config_flags

from spo_jax import config as config_lib
from spo_jax import configs
from spo_jax import optim
from spo_jax.checkpoint import CheckpointError, debug_enabled
from spo_jax.compile_cache import CompileStats, enable_compile_cache
from spo_jax.data import DataError
from spo_jax.metrics import DegenerateTrainingError
from spo_jax.models import ModelError
from spo_jax.train import STOP_REQUESTED, train
from spo_jax.validation import ConfigError

__all__ = ["summary", "EXIT_CODES", "PREFIXES", "LIBRARY_LOGGERS", "setup_console", "config_summary", "classify",
           "failure_message", "STOPPED_BY", "install_stop_handlers", "usage", "resolve_config_arg", "main"]


def summary(result) -> dict:
    """The printed summary of a ``TrainResult``: run_dir, start_step, final_eval,
    export_dir and the last training metrics."""
    out = {"run_dir": result.run_dir, "start_step": result.start_step, "final_eval": result.final_eval,
           "export_dir": result.export_dir}
    last = next((h for h in reversed(result.history) if h["split"] == "train"), None)
    if last:
        out["last_train"] = last
    return out


#: Exit codes of expected failures (each prints one line on stderr; ``--debug`` or
#: ``SPO_JAX_DEBUG=1`` shows the traceback instead). 1 is an unexpected error (a bug:
#: always with its traceback).
EXIT_CODES = {
    "config": 2,       # a config field: its name, value and the fix
    "data": 3,         # a data file, line, row or column
    "model": 4,        # a model / tokenizer path
    "checkpoint": 5,   # a checkpoint that cannot be restored or written (e.g. a full disk)
    "diverged": 6,     # non-finite or degenerate training; names the last good checkpoint
    "os": 7,           # the file system: no space left, permission denied, a missing directory
    "interrupted": 130,  # Ctrl-C
    "hangup": 129,       # SIGHUP (the terminal closed): the loop saved a checkpoint after the current step
    "terminated": 143,   # SIGTERM: the loop saved a checkpoint after the current step
}

PREFIXES = {"config": "config error: ", "data": "data error: ", "model": "model error: ",
            "checkpoint": "checkpoint error: ", "diverged": "training stopped: ", "os": "file system error: ",
            "interrupted": "", "hangup": "", "terminated": ""}

#: Loggers of libraries whose INFO records are chatter (Orbax logs through absl).
LIBRARY_LOGGERS = ("absl", "jax", "orbax", "datasets", "transformers", "tensorstore", "urllib3", "filelock",
                   "huggingface_hub", "httpx", "fsspec")

flags.DEFINE_bool("debug", False, "show the full traceback of an expected failure (also SPO_JAX_DEBUG=1)")

logger = logging.getLogger("spo_jax.cli")


class _DropReportedDataErrors(logging.Filter):
    """``datasets`` logs a file it cannot parse before raising; spo_jax names file and line itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Failed to load JSON from file", "Failed to read file"))


def setup_console(verbosity: int) -> None:
    """The run's own story on stderr (spo_jax INFO records: config, data counts,
    resume, evaluation, where the run went; the progress bar), library chatter only
    at WARNING. ``--verbosity=1`` (absl's flag) shows the libraries' INFO records
    and datasets' progress bars; ``--verbosity=-1`` leaves only warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]  # replaces absl's handler (its prefix repeats the time and thread per line)
    root.setLevel(logging.INFO if verbosity >= 0 else logging.WARNING)
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO if verbosity >= 1 else logging.WARNING)
        lg.handlers.clear()  # datasets / huggingface_hub / transformers add their own: each record printed twice
        lg.propagate = True
    handler.addFilter(_DropReportedDataErrors())
    if verbosity < 1:
        datasets.disable_progress_bars()


def config_summary(c) -> str:
    """One line: what this run is."""
    model = c.model.path or f"inline {dict(c.model.config or {}).get('model_type', '?')} config"
    loss = "sft (token NLL)" if c.stage == "sft" else c.loss.name + (" + SPO" if c.spo.enabled else "")
    if c.stage != "sft" and c.loss.sft_data_weight:
        loss += f" + {c.loss.sft_data_weight:g}·SFT-data NLL"
    sft = f"sft_data={c.data.sft_path} " if c.data.sft_path else ""
    return (f"stage={c.stage} model={model} loss={loss} train={c.data.train_path or '-'} "
            f"eval={c.data.eval_path or '-'} {sft}steps={c.train.num_steps} batch={c.data.batch_size} "
            f"lr={optim.learning_rate(c):g} seed={c.seed} run_dir={os.path.abspath(os.path.expanduser(c.run_dir))}")


#: Exception classes of the expected failures and their kinds (checked in order).
_KINDS = ((KeyboardInterrupt, "interrupted"), (ConfigError, "config"), (DataError, "data"), (ModelError, "model"),
          (CheckpointError, "checkpoint"), (DegenerateTrainingError, "diverged"))


def classify(e: BaseException) -> str | None:
    """The kind of an expected failure (a key of ``EXIT_CODES``), None for a bug."""
    for cls, kind in _KINDS:
        if isinstance(e, cls):
            return kind
    if isinstance(e, OSError) and e.errno is None and _raised_in(e, ("/transformers/", "/huggingface_hub/")):
        return "model"  # a Hub id that cannot be fetched, a directory without config.json / tokenizer files
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS,
                                              errno.EDQUOT, errno.ENOTDIR, errno.EISDIR):
        return "os"
    return None


def _raised_in(e: BaseException, parts: tuple[str, ...]) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if any(p in tb.tb_frame.f_code.co_filename for p in parts):
            return True
        tb = tb.tb_next
    return False


def failure_message(kind: str, e: BaseException, c) -> str:
    if kind == "interrupted":
        return (f"interrupted; rerun the same command to resume from the last complete checkpoint in "
                f"{os.path.join(os.path.abspath(os.path.expanduser(c.run_dir)), 'checkpoints')}")
    if kind == "model" and isinstance(e, OSError):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return (f"cannot load model.path={c.model.path!r} / model.tokenizer={c.model.tokenizer!r}: {first} "
                "(a Hub id needs network access; a local model is a directory with config.json)")
    if kind == "os":
        what = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
        return (f"{what}: {e.filename or e}; free space or fix the path/permissions, then rerun the same command "
                "(it resumes from the last complete checkpoint)")
    return str(e)


#: The signals that stop a run with a checkpoint, and the exit code kind of each.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_EXIT = {"SIGINT": "interrupted", "SIGTERM": "terminated", "SIGHUP": "hangup"}

#: The signals that asked this process to stop, in order (names).
STOPPED_BY: list[str] = []


def install_stop_handlers() -> None:
    """SIGINT (Ctrl-C), SIGTERM (pre-emption) and SIGHUP (the terminal or SSH session closed) set
    ``train.STOP_REQUESTED``: the loop saves a checkpoint after the current step and the CLI exits
    130 / 143 / 129. Python runs a signal
    handler only between bytecodes of the main thread, which can be inside an XLA compile for
    minutes, and a ``KeyboardInterrupt`` raised there can be swallowed (XLA's gc callback):
    so the handlers do nothing, and a thread woken by the C-level handler
    (``signal.set_wakeup_fd``) acts at once: it sets the flag and says so on stderr; a second
    Ctrl-C quits at once (exit 130; every complete checkpoint is kept)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: None)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch_signals, args=(r,), name="spo_jax-stop", daemon=True).start()


def _watch_signals(fd: int) -> None:
    while True:
        for signum in os.read(fd, 64):
            _on_signal(signum)


def _on_signal(signum: int) -> None:
    name = signal.Signals(signum).name
    if STOP_REQUESTED.is_set():
        if signum == signal.SIGINT:
            try:
                os.write(2, b"second Ctrl-C: quitting now; rerun the same command to resume from the last complete "
                            b"checkpoint\n")
            except OSError:
                pass
            os._exit(EXIT_CODES["interrupted"])
        return
    STOPPED_BY.append(name)
    STOP_REQUESTED.set()
    try:  # after a SIGHUP the terminal may be gone (EIO): the stop goes on without the line
        os.write(2, f"{name} received: stopping after the current step, with a checkpoint there (Ctrl-C again to "
                    "quit at once)\n".encode())
    except OSError:
        pass


def _stopped_message(result) -> str:
    name = STOPPED_BY[0] if STOPPED_BY else "a stop request"
    step = int(jax.device_get(result.state.step))
    if step > result.start_step:
        return f"stopped by {name} after step {step} with a checkpoint there; rerun the same command to resume"
    where = (f"the last checkpoint is step {step}; rerun the same command to resume" if step else
             "nothing was trained; rerun the same command to start")
    return f"stopped by {name} before the first step of this run; {where}"


def _usage_error(message: str) -> None:
    print(f"usage error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_CODES["config"])


_started = False  # set once absl has parsed the flags (what fails before is a bad flag)
_command = None  # what runs instead of training (main's ``command``: spo_jax.plan)


def _main(args) -> None:
    global _started
    _started = True
    if len(args) > 1:
        _usage_error(f"unexpected arguments {args[1:]}; use --config.a.b=value")
    try:
        cfg = flags.FLAGS.config
        cfg.get("stage")  # a config file that failed to load raises here
    except OSError as e:  # ml_collections: the file does not exist or does not import
        _usage_error(f"--config: {' '.join(str(e).split())}")
    except AttributeError:
        cfg = None
    if cfg is None:
        _usage_error("--config=<preset or file> is required (--help lists every config field)")
    install_stop_handlers()
    setup_console(int(flags.FLAGS.verbosity))
    debug = flags.FLAGS.debug or debug_enabled()
    try:
        cache_dir = enable_compile_cache(cfg.compile_cache)
    except ValueError as e:  # an unusable directory: the message names it and the fix
        print(f"config error: config.compile_cache={cfg.compile_cache!r}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CODES["config"]) from None
    try:
        main_process = jax.process_index() == 0  # starts JAX's backend
    except RuntimeError as e:
        env = {k: os.environ[k] for k in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME") if os.environ.get(k)}
        print(f"config error: JAX cannot start a backend with the environment {env or '(no JAX_PLATFORMS)'}: "
              f"{str(e).splitlines()[0]}; unset JAX_PLATFORMS to use what this machine has, or name one of its "
              "platforms (e.g. JAX_PLATFORMS=cpu)", file=sys.stderr)
        raise SystemExit(EXIT_CODES["config"]) from None
    if main_process:
        logger.info("%s", config_summary(cfg))
    try:
        with CompileStats() as compiles:
            result = train(cfg) if _command is None else _command(cfg)
    except BaseException as e:  # noqa: BLE001 - expected failures become one line and an exit code
        kind = classify(e)
        if kind is None or debug:
            raise
        print(f"{PREFIXES[kind]}{failure_message(kind, e, cfg)}", file=sys.stderr)
        raise SystemExit(EXIT_CODES[kind]) from None
    if _command is not None:
        return
    logger.info("compile cache %s: %s", cache_dir or "off", compiles.summary())
    if STOP_REQUESTED.is_set() and cfg.stage != "eval" and int(jax.device_get(result.state.step)) < cfg.train.num_steps:
        print(_stopped_message(result), file=sys.stderr)
        raise SystemExit(EXIT_CODES[STOP_EXIT.get(STOPPED_BY[0] if STOPPED_BY else "", "interrupted")])
    if jax.process_index() == 0:
        logger.info("run directory %s%s", result.run_dir,
                    f"; exported model {result.export_dir}" if result.export_dir else "")
        out = summary(result)
        out["compile"] = {"cache_dir": cache_dir, "programs": compiles.programs, "compiled": compiles.compiled,
                          "cache_hits": compiles.cache_hits, "seconds": round(compiles.seconds, 2)}
        print(json.dumps(out, default=str))


def usage(doc: str | None = None) -> str:
    """``doc`` (default: this module's docstring), the exit codes, and every config field with its
    default and description (``config.field_help``): what ``--help`` prints."""
    help_ = config_lib.field_help()
    lines = [(doc or __doc__).strip().replace("{presets}", configs.describe()), "",
             "Exit codes: 0 done; 1 unexpected error (a bug: traceback); "
             + "; ".join(f"{code} {kind}" for kind, code in EXIT_CODES.items()) + ".", "",
             "Config fields (--config.<field>=<value>; default, then description):", ""]
    for name, default in config_lib.config_fields():
        lines.append(f"  {name} = {default!r}")
        lines.append(f"      {help_.get(name, '')}")
    return "\n".join(lines) + "\n"


def resolve_config_arg(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config`` (``--config=X`` or ``--config X``) resolved by
    ``spo_jax.configs.resolve``: a preset name to its module, a ``.json`` run description to its
    loader. A value that is neither a file nor a preset prints one line naming the presets and
    exits 2."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            value, put = a[len("--config="):], lambda v, i=i: f"--config={v}"
        elif a == "--config" and i + 1 < len(out):
            value, put, i = out[i + 1], lambda v: v, i + 1
        else:
            continue
        resolved = configs.resolve(value)
        if resolved is None:
            print(f"usage error: --config={value} is neither a file nor a preset; presets: "
                  f"{', '.join(configs.PRESETS)} (e.g. --config=dpo), or a config file path", file=sys.stderr)
            raise SystemExit(EXIT_CODES["config"])
        out[i] = put(resolved)
    return out


def main(argv=None, command=None, doc: str | None = None) -> None:
    """The command line: ``command(config)`` (default: ``spo_jax.train.train`` and the run's summary) with the
    same config flags, console and failure handling; ``doc`` heads ``--help``."""
    global _command
    _command = command
    argv = resolve_config_arg(sys.argv if argv is None else argv)
    config_flags.DEFINE_config_file("config", None, "a preset name (" + ", ".join(configs.PRESETS) + "), a config "
                                    "file, or a run's config.json; every field is listed above with its default",
                                    lock_config=True)
    sys.modules["__main__"].__doc__ = usage(doc)  # absl's --help prints it, then the flags
    try:
        app.run(_main, argv=argv)
    except SystemExit as e:
        if not _started and e.code == 1:
            if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in (argv or sys.argv)[1:]):
                raise SystemExit(0) from None  # absl exits 1 after printing the help
            raise SystemExit(EXIT_CODES["config"]) from None  # absl printed "FATAL Flags parsing error: ..."
        raise
    except (AttributeError, KeyError) as e:
        if _started:
            raise
        # ml_collections: an override of a field that does not exist (its message suggests the spelling)
        text = str(e.args[0] if e.args else e)
        key = re.search(r"(\w+)", text)
        maybe = re.findall(r'"(\w+)"', text)
        print(f"config error: no config field {key.group(1) if key else text!r} (a --config.* flag)"
              f"{'; did you mean ' + maybe[0] + '?' if maybe else ''} -- --help lists every field", file=sys.stderr)
        raise SystemExit(EXIT_CODES["config"]) from None


if __name__ == "__main__":
    main()
