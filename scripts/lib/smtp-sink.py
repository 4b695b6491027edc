"""The stack's SMTP sink: an aiosmtpd server that delivers every message into
a Maildir, as `python3 -m aiosmtpd -c aiosmtpd.handlers.Mailbox DIR` does,
at a fraction of its CPU.

aiosmtpd's Mailbox handler parses each message into an email.message object
and serialises it again to add three headers; at the stack's rates that cost
more than half a core, on a machine whose two cores the broker, Postgres,
the relay, order-api and the notifier share. This handler writes the bytes
the client sent, with the same three headers (X-Peer, X-MailFrom, X-RcptTo)
added at the end of the header block, into tmp/ and renames the file into
new/ (Maildir's delivery; no fsync, as the Mailbox handler). It offers
PIPELINING, as Postfix and the mail services do. --workers N
runs N processes accepting on one listening socket, so the sink can use more
than one core when the machine has it to spare.

    smtp-sink.py --listen 127.0.0.1:2525 --workers 2 .run/smtp-maildir
"""

import argparse
import asyncio
import ctypes
import itertools
import os
import signal
import socket
import sys
import time

from aiosmtpd.smtp import SMTP

PR_SET_PDEATHSIG = 1


class MaildirHandler:
    def __init__(self, root):
        self.tmp = os.path.join(root, "tmp")
        self.new = os.path.join(root, "new")
        for d in (self.tmp, self.new, os.path.join(root, "cur")):
            os.makedirs(d, exist_ok=True)
        self.host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        self.counter = itertools.count()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # aiosmtpd reads each command line as it comes, pipelined or not, so
        # the sink can offer PIPELINING (RFC 2920), as Postfix and the mail
        # services do: a client then sends MAIL, RCPT and DATA in one write.
        session.host_name = hostname
        return responses[:-1] + ["250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        # Stored with Unix line ends, as Python's mailbox stores them.
        content = content.replace(b"\r\n", b"\n")
        added = (
            f"X-Peer: {session.peer}\n"
            f"X-MailFrom: {envelope.mail_from}\n"
            f"X-RcptTo: {', '.join(envelope.rcpt_tos)}\n"
        ).encode("utf-8", "surrogateescape")
        # The header block ends at the first empty line; a message without
        # one is all headers.
        end = content.find(b"\n\n")
        if end >= 0:
            cut = end + 1
        else:
            if not content.endswith(b"\n"):
                content += b"\n"
            cut = len(content)
        data = content[:cut] + added + content[cut:]
        now = time.time()
        name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(self.counter)}.{self.host}"
        tmp = os.path.join(self.tmp, name)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, os.path.join(self.new, name))
        except OSError as e:
            return f"451 Requested action aborted: {e.strerror}"
        return "250 OK"


def listening_socket(listen):
    host, _, port = listen.rpartition(":")
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on the connections of a
    # socket so made. Without it the second of a pipelined group's replies
    # waits for the client's delayed ACK of the first (40 ms).
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host or "127.0.0.1", int(port)))
    s.listen(1024)
    s.setblocking(False)
    return s


def serve(sock, root):
    async def main():
        handler = MaildirHandler(root)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler, hostname="smtp-sink"), sock=sock)
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        async with server:
            await stop

    asyncio.run(main())


def main():
    p = argparse.ArgumentParser(description="SMTP sink delivering into a Maildir")
    p.add_argument("--listen", default="127.0.0.1:2525", help="host:port to accept on")
    p.add_argument("--workers", type=int, default=1, help="processes accepting on the one socket")
    p.add_argument("maildir", help="the Maildir (tmp/, new/, cur/ are created)")
    args = p.parse_args()
    if args.workers < 1:
        p.error("--workers must be at least 1")
    try:
        sock = listening_socket(args.listen)
    except (OSError, ValueError) as e:
        p.error(f"cannot listen on {args.listen}: {e}")
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            # A worker ends with the first process, even one killed by SIGKILL.
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() == 1:
                os._exit(0)
            serve(sock, args.maildir)
            os._exit(0)
        children.append(pid)
    try:
        serve(sock, args.maildir)
    finally:
        for c in children:
            try:
                os.kill(c, signal.SIGTERM)
                os.waitpid(c, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


if __name__ == "__main__":
    sys.exit(main())
