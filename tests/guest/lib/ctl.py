"""Host side of a guest ↔ host handshake: an HTTP endpoint on 127.0.0.1:PORT (the guest reaches it as
10.0.2.2:PORT with busybox wget). Each GET's path goes to stdout as one line; the next line on stdin is the
answer, sent back as the body. Run as a coprocess by tests/guest/lazy-image.sh and bench/lazy-image.sh, which
read the requests and write the answers once they have acted on them.

Usage: python3 ctl.py PORT     (prints "listening" once it accepts connections)
"""

import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print(self.path.lstrip("/"), flush=True)
        answer = sys.stdin.readline().rstrip("\n") or "error the host side is gone"
        body = (answer + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("listening", flush=True)
server.serve_forever()
