"""HubCallbacks in a monkey-patched process, posted to from a native thread; a JSON report."""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

import gevent  # noqa: E402
from gevent.monkey import get_original  # noqa: E402

from flask_durable_stream._concurrency import HubCallbacks  # noqa: E402

start_native = get_original("_thread", "start_new_thread")
native_sleep = get_original("time", "sleep")
os_thread = get_original("_thread", "get_ident")  # the OS thread, not the greenlet
hub = gevent.get_hub()
callbacks = HubCallbacks.of(hub)
report: dict[str, object] = {"same": HubCallbacks.of(hub) is callbacks}

# In order, in the hub's thread.
seen: list[tuple[int, bool]] = []
hub_thread = os_thread()


def note(i: int) -> None:
    seen.append((i, os_thread() == hub_thread))


def post_many(n: int) -> None:
    for i in range(n):
        callbacks.post(note, i)


start_native(post_many, (1000,))
while len(seen) < 1000:
    gevent.sleep(0.01)
report["order"] = seen == [(i, True) for i in range(1000)]

# An expected post keeps the loop alive: gevent.wait() (the loop run until nothing is
# left to wait for) returns only after the callback ran, 0.2 s later, in another thread.
ran: list[str] = []


def late() -> None:
    native_sleep(0.2)
    callbacks.post(ran.append, "late")


callbacks.expect()
start_native(late, ())
gevent.wait()
report["kept_alive"] = ran == ["late"]

# With nothing expected, the watcher does not keep the loop alive.
gevent.wait()
report["idle_returns"] = True

# libev's count of active watchers stays where it was, however many posts arrive
# from another thread while the hub starts and stops timers (what
# loop.run_callback_threadsafe got wrong).
base = hub.loop.activecnt
count = [0]
N = 200_000


def bump() -> None:
    count[0] += 1


def post_bumps() -> None:
    for _ in range(N):
        callbacks.post(bump)


def tick() -> None:
    while count[0] < N:
        gevent.sleep(0.0001)


start_native(post_bumps, ())
gevent.joinall([gevent.spawn(tick) for _ in range(50)])
gevent.sleep(0.05)
report["count"] = [count[0], hub.loop.activecnt - base]

# A child forked while a post is expected, and one is queued: the thread that was to post
# is not in the child. It starts with nothing expected or queued, and its loop ends.
callbacks.expect()
callbacks._items.append((ran.append, ("stale",)))
# gevent's fork watches the child, but installs its SIGCHLD handler only then: a child that
# exits before it would never be seen, and the parent's waitpid would wait for ever.
hub.loop.install_sigchld()
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a loop kept alive would wait for ever: the child dies instead
    gevent.wait()
    os._exit(0 if "stale" not in ran else 3)
callbacks.post(ran.append, "parent")  # what the parent's thread would post
_, status = os.waitpid(pid, 0)
report["forked_child"] = os.waitstatus_to_exitcode(status)
gevent.wait()
report["parent_after_fork"] = ran[-2:] == ["stale", "parent"]
print(json.dumps(report))
