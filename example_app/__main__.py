"""``python -m example_app [--port 5000]``: the example app on gevent's WSGI server."""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from example_app import create_app  # noqa: E402
from flask_durable_stream.runner import shutdown_all  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app()
    server = WSGIServer((args.host, args.port), app, log=None)
    grace = float(app.config["DURABLE_STREAM_SHUTDOWN_GRACE"])

    stopping = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        gevent.signal_handler(sig, stopping.set)
    server.start()
    print(f"example app on http://{args.host}:{args.port}/  (Ctrl-C to stop)", flush=True)
    stopping.wait()
    # Not serve_forever(): closing the listener makes it kill the open connections a
    # second later, in the middle of the flows' grace period. Here the steps are in order:
    # stop accepting, give running flows the grace, store UNAVAILABLE for the rest and
    # let their followers send that last frame (shutdown_all), then close what is left.
    server.close()
    shutdown_all(grace)
    server.stop(timeout=1)


if __name__ == "__main__":
    main()
