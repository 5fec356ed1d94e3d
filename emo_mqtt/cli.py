"""The ``emo`` command line: ``emo --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from emo_mqtt import __version__
from emo_mqtt.errors import EmoError

T = TypeVar("T")


def _size(text: str) -> int:
    """Parse sizes such as ``1048576``, ``100k``, ``1M``, ``10MB`` (decimal: 1M = 10**6)."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    raw = text.strip().lower().removesuffix("b")
    number = raw.rstrip("kmgi")
    unit = raw[len(number) :]
    try:
        value = int(float(number) * units[unit])
    except (KeyError, ValueError, OverflowError):  # OverflowError: "inf", "1e999"
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (try 100000, 100k, 1M, 10MB)"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _int_at_least(text: str, minimum: int, want: str) -> int:
    """``text`` as an int >= ``minimum``; ``want`` says what is expected when it is not."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {want}: {text!r}")
    return value


def _count(text: str) -> int:
    """A positive int (a count of 0 would make a benchmark wait for nothing, forever)."""
    return _int_at_least(text, 1, "at least 1")


def _seed_list(text: str) -> list[int]:
    """``1,2,3``: distinct seeds (ints >= 0), in the order given."""
    seeds = [_int_at_least(part.strip(), 0, "a seed >= 0") for part in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated: {text!r}")
    return seeds


def _chunk_size(text: str) -> int:
    """A size within the bounds of ``BusOptions.chunk_size``."""
    value = _size(text)
    if not 64 <= value <= 1024 * 1024:
        raise argparse.ArgumentTypeError(
            f"chunk size must be between 64 bytes and 1 MiB (1048576): {text!r}"
        )
    return value


def _add_broker_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="broker to use: mqtt://host:port (or tcp://host:port, or host:port) or "
        "mqtts://host:port; without it, emo starts its own (Mosquitto if installed, else "
        "embedded amqtt)",
    )


@contextmanager
def broker_for(
    url: str | None, say: Callable[[str], None], max_packet_size: int | None = None
) -> Iterator[str]:
    """Yield ``url``, or start a broker of our own for the duration and yield its URL."""
    if url is not None:
        from emo_mqtt.broker.url import parse_broker_url

        parsed = parse_broker_url(url)  # a bad URL fails here, with a clear message
        _check_reachable(parsed.host, parsed.port, url)
        yield str(parsed) if parsed.password is None else url
        return
    from emo_mqtt.broker.launch import DEFAULT_MAX_PACKET_SIZE, BrokerHandle

    cap = DEFAULT_MAX_PACKET_SIZE if max_packet_size is None else max_packet_size
    with BrokerHandle(kind="auto", max_packet_size=cap) as handle:
        say(f"broker: {handle.describe()}")
        yield handle.url


@contextmanager
def brokers_for_run(
    args: argparse.Namespace, config: Any, say: Callable[[str], None]
) -> Iterator[tuple[str, Any]]:
    """``emo run``'s brokers: ``(url, None)`` as :func:`broker_for`, or with
    ``--topology sites`` a cloud and bridged site brokers of our own: ``(cloud url, sites)``."""
    if args.topology != "sites":
        with broker_for(args.broker, say) as url:
            yield url, None
        return
    from emo_mqtt.broker.sites import SiteBrokers
    from emo_mqtt.errors import ConfigError

    if args.broker is not None:
        raise ConfigError("--topology sites starts its own brokers: leave out --broker")
    if config.network.enabled:
        raise ConfigError("[network] shaping and --topology sites do not combine yet")
    with SiteBrokers(config) as sites:
        say(f"brokers: {sites.describe()}")
        yield sites.cloud.url, sites


def _check_reachable(host: str, port: int, url: str, timeout_s: float = 3.0) -> None:
    """Fail now, in one line, if nothing listens at the broker's address.

    Otherwise an unreachable broker shows only after the data is loaded and the bus has
    spent its connect retries.
    """
    import socket

    from emo_mqtt.errors import BrokerError

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise BrokerError(f"cannot reach the broker at {url}: {reason}") from exc


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_broker(args: argparse.Namespace) -> int:
    from emo_mqtt.broker.launch import run_foreground

    code: int = run_foreground(port=args.port, host=args.host, max_packet_size=args.max_packet_size)
    return code


def cmd_scenarios(args: argparse.Namespace) -> int:
    from emo_mqtt.config import describe_scenario, shipped_scenarios

    shipped = shipped_scenarios()
    width = max(len(name) for name in shipped)
    for name, path in shipped.items():
        print(f"{name:{width}}  {describe_scenario(path)}")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from emo_mqtt.topics import SPECS, markdown_table

    if args.markdown:
        print(markdown_table(), end="")
    else:
        for spec in SPECS:
            print(
                f"emo/<run>/{spec.pattern:34} qos={spec.qos} retained={spec.retained!s:5} "
                f"{spec.publisher} -> {spec.subscribers}"
            )
    return 0


def cmd_bench_bus(args: argparse.Namespace) -> int:
    from emo_mqtt.bench import bench_bus

    say = (lambda _line: None) if args.json else _stderr
    # Our own broker must take the bare reference's unchunked payloads.
    cap = None if args.no_baseline else max(2162688, args.size + 65536)
    with broker_for(args.broker, _stderr, max_packet_size=cap) as url:
        result = asyncio.run(
            bench_bus(
                url,
                args.size,
                args.count,
                repeats=args.repeats,
                chunk_size=args.chunk_size,
                baseline=not args.no_baseline,
                progress=say,
                plain=args.plain,
            )
        )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['messages']} x {result['size']} bytes ({result['client']} client): "
            f"{result['mb_per_s']} MB/s, {result['msgs_per_s']} messages/s"
        )
        if "baseline_bare_aiomqtt_mb_per_s" in result:
            print(
                f"bare aiomqtt, same broker and run: {result['baseline_bare_aiomqtt_mb_per_s']}"
                f" MB/s, {result['baseline_msgs_per_s']} messages/s; ratio "
                f"{result['ratio_vs_bare']} ({result['baseline_note']})"
            )
    return 0


def cmd_bench_codec(args: argparse.Namespace) -> int:
    from emo_mqtt.bench import bench_codec

    rows = bench_codec(tuple(args.sizes))
    if args.json:
        print(json.dumps(rows))
    else:
        print(
            f"{'size':>10} {'origin':6} {'encode':>8} {'decode':>8} {'pickle.dumps':>12} "
            f"{'pickle.loads':>12}  (MB/s)"
        )
        for r in rows:
            print(
                f"{r['size_bytes']:>10} {r['origin']:6} {r['encode_mb_s']:>8} "
                f"{r['decode_mb_s']:>8} {r['pickle_dumps_mb_s']:>12} {r['pickle_loads_mb_s']:>12}"
            )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from emo_mqtt.demo import run_demo

    with broker_for(args.broker, _stderr) as url:
        summary = asyncio.run(run_demo(url, devices=args.devices, say=_stderr))
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from emo_mqtt.config import load_config
    from emo_mqtt.fleet import table

    config = load_config(args.scenario)
    overrides: dict[str, dict[str, object]] = {}
    if args.rounds is not None:
        overrides.setdefault("run", {})["rounds"] = args.rounds
    if args.algorithms is not None:
        # "fl, emo" (with the space a shell user types) means fl and emo.
        overrides.setdefault("run", {})["algorithms"] = [
            name.strip() for name in args.algorithms.split(",") if name.strip()
        ]
    if args.data_dir is not None:
        overrides.setdefault("data", {})["data_dir"] = args.data_dir
    if args.run is not None:
        overrides.setdefault("run", {})["id"] = args.run  # validated with the config
    if args.set:
        from emo_mqtt.config import with_settings

        config = with_settings(config, args.set)
    if overrides:
        config = config.with_overrides(**overrides)
    out = Path(args.out) if args.out else Path("runs") / config.run.name
    say = (lambda _line: None) if args.quiet else _stderr
    from emo_mqtt.fleet import with_run_id
    from emo_mqtt.multirun import config_record, run_once, run_seeds, seed_config
    from emo_mqtt.outdir import check_out, prepare_out

    # The run id and --out are settled before any broker starts or data is read; --out is
    # claimed (cleared, marked) once the broker is found, so a failed start leaves nothing.
    config = with_run_id(config)
    seeds: list[int] | None = args.seeds
    for seed in seeds or []:
        seed_config(config, seed)  # each seed's run id must be valid: refused now, not later
    record = config_record(config, seeded=seeds is not None)
    claim = {"overwrite": args.overwrite, "resume": args.resume, "config": record, "seeds": seeds}
    check_out(out, **claim)
    from emo_mqtt.placement import resolve_workers

    if args.workers is None and config.network.enabled:
        workers = 0  # shaped runs stay in one process (see --workers)
    else:
        workers = resolve_workers(args.workers, config.fleet.devices, os.cpu_count() or 1)
        if workers and config.network.enabled:
            from emo_mqtt.errors import ConfigError

            raise ConfigError(
                "--workers does not run scenarios with a [network] section yet: use --workers 0"
            )

    def jsonl(event: dict[str, object]) -> None:
        print(json.dumps(event, default=float), flush=True)

    on_event = jsonl if args.jsonl else None
    from emo_mqtt.broker.launch import raise_open_files_limit

    # One connection per node, in the broker we start (it inherits the limit) and here.
    raise_open_files_limit(needed=config.fleet.devices + config.fleet.overlays + 64)
    # SIGTERM outside the event loop (while the broker starts) unwinds like Ctrl-C, so that
    # the temporary broker and its directory are removed.
    signal.signal(signal.SIGTERM, _terminate)
    with brokers_for_run(args, config, say) as (url, sites):
        prepare_out(out, config.run.id, **claim)
        common: dict[str, Any] = dict(
            resume=args.resume, say=say, on_event=on_event, sites=sites, workers=workers
        )
        work = (
            run_seeds(url, config, seeds, out, **common)
            if seeds is not None
            else run_once(url, config, out, **common)
        )
        try:
            summary = asyncio.run(_until_signalled(work))
        except Signalled as stop:
            if stop.interrupted is None:
                _stderr(f"emo: {stop.name}: interrupted before the first algorithm started")
                return 128 + stop.signum
            cut = stop.interrupted.summary["interrupted"]
            if seeds is not None:
                runs = stop.interrupted.summary["runs"]
                finished = [s for s, r in runs.items() if r["state"] == "finished"]
                done = f"; finished seeds: {', '.join(finished)}" if finished else ""
                where = f"seed {cut['seed']}, "
            else:
                finished = list(stop.interrupted.summary["algorithms"])
                done = f"; finished: {', '.join(finished)}" if finished else ""
                where = ""
            _stderr(
                f"emo: {stop.name}: interrupted during {where}{cut['algorithm']} at round "
                f"{cut['last_round']}/{cut['rounds']}{done}; summary: {out / 'summary.json'}"
            )
            return 128 + stop.signum
    if args.jsonl:
        return 0  # the last JSON line ("event": "done") names the summary and report
    if args.json:
        print(json.dumps(summary))
    elif seeds is not None:
        from emo_mqtt.aggregate_seeds import pm, seeds_table

        print(f"mean ± std (sample) over seeds {', '.join(map(str, seeds))}")
        print(seeds_table(summary))
        for key, figure in summary["comparisons"].items():
            print(f"{key}: {pm(figure)}")
        print(f"summary: {out / 'summary.json'}")
    else:
        print(table(summary["algorithms"]))
        for name, entry in summary["algorithms"].items():
            if "bridge" in entry:  # --topology sites: what crossed the site<->cloud bridges
                bridge = entry["bridge"]
                print(
                    f"bridge {name}: {bridge['bytes'] / 1e6:.2f} MB "
                    f"(activations {bridge['activation_bytes'] / 1e6:.2f} MB)"
                )
        for key, value in summary["comparisons"].items():
            print(f"{key}: {value}")
        print(f"summary: {out / 'summary.json'}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python runs (outside the event loop's own handlers)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


class Signalled(Exception):
    """``emo run`` stopped on a signal, its finished results written (``interrupted``)."""

    def __init__(self, signum: int, interrupted: Any | None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.interrupted = interrupted


#: After SIGINT/SIGTERM, how long the run may take to stop before it is cancelled again.
_RECANCEL_S = 30.0


async def _until_signalled(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``; on SIGINT or SIGTERM cancel it (it writes what finished) and raise
    :class:`Signalled`. SIGTERM is what ``timeout`` and ``docker stop`` send: treated as
    Ctrl-C, so the temporary broker and directories are removed either way."""
    from emo_mqtt.fleet import Interrupted

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    got: list[int] = []

    def on_signal(signum: int) -> None:
        got.append(signum)
        task.cancel()
        if len(got) == 1:
            loop.call_later(_RECANCEL_S, cancel_again)

    def cancel_again() -> None:
        # A cancellation can be swallowed (Python 3.11's asyncio.wait_for returns the
        # result of an inner future that completed in the same step, and aiomqtt waits
        # on its connects that way): the run then went on, or waited forever, after
        # Ctrl-C. Cancelling again until the work ends makes an interrupt final.
        if not task.done():
            logging.getLogger(__name__).warning(
                "still stopping after %g s: cancelling again", _RECANCEL_S
            )
            task.cancel()
            loop.call_later(_RECANCEL_S, cancel_again)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await task
    except Interrupted as exc:
        raise Signalled(got[0] if got else signal.SIGINT, exc) from None
    except asyncio.CancelledError:
        if not got:
            raise
        raise Signalled(got[0], None) from None  # before the first algorithm started
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def cmd_node(args: argparse.Namespace) -> int:
    from emo_mqtt.broker.url import BrokerURL
    from emo_mqtt.errors import ConfigError
    from emo_mqtt.nodes.standalone import run_standalone

    broker: str | BrokerURL | None = args.broker
    run, node_id = args.run, args.id
    if args.node_config is not None:
        from emo_mqtt.provision import load_node_config

        node = load_node_config(args.node_config)
        if node.role != args.role:
            raise ConfigError(
                f"--node-config {args.node_config} is for a {node.role}, not a {args.role}"
            )
        broker = node.broker
        if args.broker is not None:  # another address for the same broker: keep the login
            from dataclasses import replace

            from emo_mqtt.broker.url import parse_broker_url

            given = parse_broker_url(args.broker)
            broker = replace(node.broker, scheme=given.scheme, host=given.host, port=given.port)
        if node_id is not None and node_id != node.node_id:
            raise ConfigError(
                f"--id {node_id} does not match the credentials of "
                f"--node-config {args.node_config} ({node.node_id})"
            )
        run = run or node.run
        node_id = node.node_id
    if broker is None or run is None:
        raise ConfigError("emo node needs --broker and --run (or a --node-config with them)")
    if node_id is None and args.role != "server":
        raise ConfigError(
            f"emo node {args.role} needs --id (which {args.role} of the scenario "
            f"this is, e.g. {'dev00' if args.role == 'device' else 'ovl0'})"
        )
    asyncio.run(
        run_standalone(
            args.role,
            broker,
            run,
            node_id or "server",
            args.config,
            args.algorithm,
            Path(args.out) if args.out else None,
        )
    )
    return 0


def cmd_fleet_provision(args: argparse.Namespace) -> int:
    from emo_mqtt.provision import provision

    if args.sites is not None:
        from emo_mqtt.errors import ConfigError
        from emo_mqtt.sitesprovision import provision_sites

        if args.overlays not in (0, args.sites):
            raise ConfigError(
                f"--sites {args.sites}: one overlay per site, so --overlays is {args.sites}"
            )
        if args.fleet_replay:
            # A site's broker carries its own devices' activations only (they stay on site).
            raise ConfigError("--fleet-replay cannot be combined with --sites")
        hosts = None if args.site_hosts is None else [h.strip() for h in args.site_hosts.split(",")]
        result = provision_sites(
            Path(args.out),
            args.devices,
            args.sites,
            host=args.host,
            port=args.port,
            site_hosts=hosts,
            site_port=args.site_port,
            run=args.run,
            bind=args.bind,
        )
        print(json.dumps(result, indent=2))
        return 0
    result = provision(
        Path(args.out),
        args.devices,
        args.overlays,
        host=args.host,
        port=args.port,
        run=args.run,
        bind=args.bind,
        fleet_replay=args.fleet_replay,
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from emo_mqtt.infer import infer_command

    result = infer_command(
        Path(args.run_dir),
        algorithm=args.algorithm,
        data_dir=args.data_dir,
        broker=args.broker,
        serve=args.serve,
        limit=args.limit,
    )
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from emo_mqtt.broker.url import parse_broker_url
    from emo_mqtt.dashboard import run_dashboard

    parse_broker_url(args.broker)  # a bad URL fails here, with a clear message
    return run_dashboard(args.broker, args.host, args.port)


def _tcp_port(text: str) -> int:
    """A TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535: {text!r}")
    return value


def _workers(text: str) -> int:
    """A number of worker processes (0: none, every node in this process)."""
    return _int_at_least(text, 0, "0 (all in this process) or more")


def _non_negative(text: str) -> int:
    """An int >= 0 (0: no limit)."""
    return _int_at_least(text, 0, "0 (no limit) or more")


def _positive_float(text: str) -> float:
    """A finite number > 0 (a speed, a bucket width in seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def cmd_traffic_summary(args: argparse.Namespace) -> int:
    from emo_mqtt.traffic import format_summary, read_log, summarize_log

    summary = summarize_log(read_log(args.log), bucket_s=args.bucket_s)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def cmd_traffic_replay(args: argparse.Namespace) -> int:
    from emo_mqtt.topics import validate_id
    from emo_mqtt.traffic import read_log, replay_log

    rows = read_log(args.log)  # a bad log fails before any broker is started
    if args.run is not None:
        validate_id(args.run, "run")
    with broker_for(args.broker, _stderr) as url:
        result = asyncio.run(replay_log(rows, url, run=args.run, speed=args.speed, say=_stderr))
    notes = [
        f"{result[k]} {what}"
        for k, what in (("skipped", "skipped"), ("unretained", "sent non-retained"))
        if result[k]
    ]
    print(
        f"replayed {result['messages']} messages, {result['bytes']} bytes in "
        f"{result['wall_s']} s (speed {result['speed']:g}, worst lag {result['lag_s_max']} s)"
        + "".join(f", {note}" for note in notes)
    )
    return 0


class _SubcommandsWithVerbose:
    """Adds the shared ``-v`` option to every parser made by ``add_parser``, nested ones too."""

    def __init__(self, actions: Any, verbose: argparse.ArgumentParser) -> None:
        self._actions = actions
        self._verbose = verbose

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._actions.add_parser(
            name, parents=[self._verbose], **kwargs
        )
        original = parser.add_subparsers

        def add_subparsers(**sub_kwargs: Any) -> _SubcommandsWithVerbose:
            return _SubcommandsWithVerbose(original(**sub_kwargs), self._verbose)

        parser.add_subparsers = add_subparsers  # type: ignore[method-assign,assignment]
        return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emo",
        description="emo-mqtt: Edge Model Overlays for federated learning over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"emo-mqtt {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # -v also after the subcommand (`emo run x.toml -v`): every subparser takes it too.
    # SUPPRESS keeps a subcommand without -v from resetting a count given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more logging (-vv: debug)",
    )
    sub = _SubcommandsWithVerbose(commands, verbose)

    p = sub.add_parser("broker", help="run Mosquitto in the foreground with the project's config")
    p.add_argument("--port", type=int, default=1884, help="port to listen on (default 1884)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--max-packet-size",
        type=_size,
        default=2162688,
        help="largest MQTT packet accepted (default 2162688 = 2 MiB + 64 KiB; "
        "raise it, e.g. 20MB, for `emo bench bus`'s unchunked reference)",
    )
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("demo", help="move real tensors between nodes through a broker")
    _add_broker_option(p)
    p.add_argument("--devices", type=int, default=4, help="number of device nodes (default 4)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run every algorithm of a scenario on a local fleet")
    p.add_argument(
        "scenario",
        help="scenario file, or the name of a shipped one (quickstart; `emo scenarios` lists them)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any scenario key, e.g. --set fleet.devices=4 --set data.partition=iid "
        '(repeatable; values as in TOML: 2, 0.5, true, ["fl", "emo"])',
    )
    _add_broker_option(p)
    p.add_argument(
        "--topology",
        choices=["single", "sites"],
        default="single",
        help="single: one broker (default); sites: a cloud broker for the server and one "
        "bridged site broker per overlay for it and its devices (docs/deployment.md)",
    )
    p.add_argument("--out", help="output directory (default runs/<scenario name>)")
    p.add_argument("--rounds", type=int, help="override run.rounds")
    p.add_argument("--algorithms", help="override run.algorithms, e.g. fl,emo")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    p.add_argument(
        "--run",
        metavar="ID",
        help="run id on the broker (topics emo/<ID>-<algorithm>/...; default: the "
        "scenario's name plus a random suffix); refused if a run with it is live",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (without it or --resume, "
        "such an --out is refused)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish the run in --out: keep the algorithms (and seeds) that finished, run "
        "the others; refused if the configuration changed",
    )
    p.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="N,N,...",
        help="run the scenario once per seed (run.seed), into <out>/seed-<N>/, and write "
        "mean ± std over the seeds to <out>/summary.json",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="run the devices and overlays in N worker processes, the server in this one "
        "(0: all in this process; default: one per CPU core for fleets of 200 devices or "
        "more, 0 below, and 0 for scenarios with a [network] section)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--jsonl",
        action="store_true",
        help="print one JSON object per line on stdout: one per round of each "
        "algorithm, then a last one with the summary's path (progress stays on "
        "stderr unless --quiet)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("node", help="run one node of a fleet (server, overlay or device)")
    p.add_argument("role", choices=["server", "overlay", "device"])
    p.add_argument(
        "--broker", metavar="URL", help="mqtt://host:port or mqtts://user:password@host:port"
    )
    p.add_argument("--run", help="run id shared by the fleet's nodes")
    p.add_argument("--id", help="this node's id (dev00.., ovl0.., server; default server)")
    p.add_argument(
        "--node-config",
        metavar="FILE",
        help="node.json from `emo fleet provision`: broker, TLS files, username, "
        "password, id and run (--run overrides it; --broker changes only the "
        "address, keeping the login and TLS files)",
    )
    p.add_argument("--config", required=True, help="the fleet's scenario file")
    p.add_argument(
        "--algorithm", default="emo", help="fl, sfl, sfl_v1, emo, emo_all, emo_int8 or emo_fixed"
    )
    p.add_argument("--out", help="server: directory for the trained models")
    p.set_defaults(func=cmd_node)

    fleet = sub.add_parser("fleet", help="deploying a fleet").add_subparsers(
        dest="fleet", metavar="WHAT", required=True
    )
    p = fleet.add_parser(
        "provision",
        help="CA, certificates, passwords, ACLs and a Mosquitto config for a fleet on a TLS broker",
    )
    p.add_argument("--devices", type=_count, required=True, help="number of devices")
    p.add_argument("--overlays", type=int, default=0, help="number of overlays (default 0)")
    p.add_argument("--out", required=True, help="new directory for the files")
    p.add_argument("--run", help="pin the ACLs and node configs to this run id (default: any)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="broker host name or address the nodes connect to (in its certificate)",
    )
    p.add_argument("--port", type=int, default=8883, help="TLS port (default 8883)")
    p.add_argument("--bind", help="address the broker listens on (default: all)")
    p.add_argument(
        "--fleet-replay",
        action="store_true",
        help='every overlay may read every device\'s activations ([emo] replay_scope = "fleet")',
    )
    p.add_argument(
        "--sites",
        type=_count,
        help="K edge sites: also write K site brokers (overlay k and its devices) bridged "
        "to this cloud broker over TLS, under OUT/sites/site<k>/ (docs/deployment.md)",
    )
    p.add_argument(
        "--site-hosts",
        metavar="H0,H1,...",
        help="with --sites: each site broker's host name or address (default: --host)",
    )
    p.add_argument(
        "--site-port",
        type=int,
        help="with --sites: site k listens on this port + k (default: --port + 1)",
    )
    p.set_defaults(func=cmd_fleet_provision)

    p = sub.add_parser("infer", help="ensemble inference from a saved run")
    p.add_argument("run_dir", help="an `emo run` output directory")
    p.add_argument("--algorithm", default="emo", help="which algorithm's models (default emo)")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    p.add_argument(
        "--limit",
        type=_non_negative,
        default=0,
        help="evaluate on the first N test images (default 0: all of them)",
    )
    _add_broker_option(p)
    p.add_argument(
        "--serve",
        action="store_true",
        help="serve MQTT inference requests on --broker until interrupted",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("dashboard", help="serve a live web dashboard of the fleets on a broker")
    p.add_argument(
        "--broker", required=True, metavar="URL", help="the broker the fleet uses, mqtt://host:port"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=_tcp_port, default=8050, help="HTTP port (default 8050)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("scenarios", help="list the shipped scenarios (usable by name)")
    p.set_defaults(func=cmd_scenarios)

    p = sub.add_parser("topics", help="list every topic of the system")
    p.add_argument("--markdown", action="store_true", help="print the table of docs/topics.md")
    p.set_defaults(func=cmd_topics)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench", metavar="WHAT", required=True
    )
    p = bench.add_parser("bus", help="throughput of the whole bus path vs bare aiomqtt")
    _add_broker_option(p)
    p.add_argument("--size", type=_size, default=10_000_000, help="tensor bytes (default 10MB)")
    p.add_argument("--count", type=_count, default=20, help="tensors per repeat (default 20)")
    p.add_argument("--repeats", type=_count, default=3, help="alternating repeats (default 3)")
    p.add_argument(
        "--chunk-size",
        type=_chunk_size,
        default=None,
        help="largest MQTT payload before chunking (default 1MiB)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the bare aiomqtt reference")
    p.add_argument(
        "--plain",
        action="store_true",
        help="measure the bus's fallback on aiomqtt's public API only "
        "(what EMO_MQTT_PLAIN=1 selects) instead of its fast client",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_bus)
    p = bench.add_parser("codec", help="encode/decode speed vs pickle")
    p.add_argument("--sizes", type=_size, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench_codec)

    traffic = sub.add_parser("traffic", help="message logs of emo run: summary, replay")
    traffic_sub = traffic.add_subparsers(dest="traffic", metavar="WHAT", required=True)
    p = traffic_sub.add_parser("summary", help="totals of a messages.csv, by sender, kind, time")
    p.add_argument("log", help="a message log, e.g. runs/quickstart/emo/messages.csv")
    p.add_argument(
        "--bucket-s",
        type=_positive_float,
        default=1.0,
        help="width of the time buckets in seconds (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_traffic_summary)
    p = traffic_sub.add_parser(
        "replay", help="publish a messages.csv's traffic again (timing and sizes, random content)"
    )
    p.add_argument("log", help="a message log, e.g. runs/quickstart/emo/messages.csv")
    _add_broker_option(p)
    p.add_argument("--run", help="run id of the replayed topics (default <logged run>-replay)")
    p.add_argument(
        "--speed",
        type=_positive_float,
        default=1.0,
        help="time factor: 2 replays twice as fast (default 1)",
    )
    p.set_defaults(func=cmd_traffic_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``emo`` console script."""
    code = _main(argv)
    if argv is None:
        # The console script is done: a Ctrl-C now, while the interpreter joins the compute
        # threads on its way out, would print a KeyboardInterrupt traceback from threading
        # instead of ending quietly. (Not for in-process callers, which passed argv.)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "node" and args.verbose == 0:
        # A standalone node says what it does (connected, waiting, rounds, done) by default;
        # the libraries under it stay at WARNING.
        logging.getLogger("emo_mqtt").setLevel(logging.INFO)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except BrokenPipeError:
        # `emo scenarios | head -1`: the reader left. Say nothing more (Python's own recipe:
        # point stdout at /dev/null so the flush at exit cannot raise again).
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a process killed by SIGPIPE
    except EmoError as exc:
        print(f"emo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"emo: {'SIGTERM' if terminated else 'SIGINT'}: interrupted", file=sys.stderr)
        return 143 if terminated else 130
    return code


if __name__ == "__main__":
    sys.exit(main())
