"""``python -m example_app [--port 5000]``: the example app on gevent's WSGI server."""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402

from example_app import create_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app()
    server = WSGIServer((args.host, args.port), app, log=None)
    print(f"example app on http://{args.host}:{args.port}/  (Ctrl-C to stop)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
