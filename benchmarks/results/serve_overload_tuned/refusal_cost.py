"""What one refusal costs the server: main-thread CPU per 429, with the model held busy (stub)."""
import json, os, socket, subprocess, sys, time, threading
from pathlib import Path
sys.path.insert(0, "/work/wt/overload/tests")
from servecheck import ServerProcess  # noqa
WT = Path("/work/wt/overload")
tmp = Path("/tmp/ufbx/rc"); tmp.mkdir(parents=True, exist_ok=True)
calls, gate = tmp / "calls", tmp / "gate"; calls.write_text(""); gate.touch()
env = {**os.environ, "PYTHONUNBUFFERED": "1", "UFB_STUB_CALLS": str(calls), "UFB_STUB_GATE": str(gate),
       "PYTHONPATH": os.environ.get("X_PP", str(WT / "src"))}
extra = [a for a in sys.argv[1:] if a.startswith("--")]; label = os.environ.get("X_PP", "default")
cmd = [sys.executable, str(WT / "tests/servestub.py"), "--host", "127.0.0.1", "--port", "0", "--threads", "1",
       "--max-concurrent-requests", "1", "--max-queue-ms", "60000", "--quiet", *extra]
srv = ServerProcess.__new__(ServerProcess); srv.log_file = tmp / "log"
with open(srv.log_file, "wb") as log:
    srv.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
srv.port = srv._wait_ready(60)
pid = srv.proc.pid
def cpu_main():
    f = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
held = threading.Thread(target=lambda: srv.post("/v1/embeddings", {"input": "hold it"}), daemon=True); held.start()
while "hold it" not in calls.read_text(): time.sleep(0.01)
body = json.dumps({"input": ["some text"] * 16}).encode()
req = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
       + str(len(body)).encode() + b"\r\n\r\n" + body)
def one():
    t = time.perf_counter(); s = socket.create_connection(("127.0.0.1", srv.port)); s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data: data += s.recv(65536)
    s.close(); assert b" 429 " in data.split(b"\r\n")[0], data[:100]; return time.perf_counter() - t
for _ in range(200): one()
n = 3000; c0 = cpu_main(); w0 = time.perf_counter(); lat = [one() for _ in range(n)]; w1 = time.perf_counter(); c1 = cpu_main()
lat.sort()
print(f"{label} {extra} refusals {n}: server main-thread CPU {1e6*(c1-c0)/n:.0f} us each; client-seen latency p50 {1e3*lat[n//2]:.2f} ms p99 {1e3*lat[int(n*.99)]:.2f} ms; {n/(w1-w0):.0f}/s sequential; loadavg {os.getloadavg()[0]:.2f}")
gate.unlink(); srv.stop()
