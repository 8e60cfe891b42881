# A stand-in for failing services in scripts/bench-failing-sinks.sh: POST /api/* (Slack) answers
# 429 with Retry-After: 1, any other POST (a webhook) 500. Loopback only; stopped by its caller.
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get('content-length') or 0))
        if self.path.startswith('/api/'):
            self.send_response(429); self.send_header('Retry-After', '1')
        else:
            self.send_response(500)
        self.send_header('content-length', '0'); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
