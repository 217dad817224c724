"""A receiver of CloudEvents batches for the tests, written as an application would:
each request's body is parsed with the CloudEvents SDK (one structured event at a time),
and a batch holding an event whose data has "poison": true is refused whole with 400
before any event of it is taken. GET /events answers the events taken, in arrival order,
as a JSON array of [id, data]; GET /batches the size of each batch taken.

Usage: python3 cloudevents_receiver.py; prints the port it listens on, then serves.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cloudevents.core.formats.json import JSONFormat

BATCH = "application/cloudevents-batch+json"
lock = threading.Lock()
taken = []
batches = []


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-type") != BATCH:
            return self.answer(415, {"error": "not a batch"})
        events = [JSONFormat().read(None, json.dumps(e)) for e in json.loads(body)]
        if any(isinstance(e.get_data(), dict) and e.get_data().get("poison") for e in events):
            return self.answer(400, {"error": "a poison event"})
        with lock:
            taken.extend([e.get_id(), e.get_data()] for e in events)
            batches.append(len(events))
        self.answer(200, {})

    def do_GET(self):
        with lock:
            self.answer(200, taken if self.path == "/events" else batches)

    def answer(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
print(server.server_address[1], flush=True)
server.serve_forever()
