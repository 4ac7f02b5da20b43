-- One request shape for every target of bench/token_endpoint.py, read from the environment:
--   WRK_METHOD   GET or POST
--   WRK_BODY     the request body (x-www-form-urlencoded), may be empty
--   WRK_HEADERS  header lines "Name: value" separated by "\n"
--   WRK_PORTS    optional "p1,p2,...": thread i connects to 127.0.0.1:p[(i-1) % n + 1]
--                (two worker processes on two ports behind one load generator)
-- At the end it prints one JSON line, prefixed "WRK_RESULT ", that the benchmark parses.

wrk.method = os.getenv("WRK_METHOD") or "GET"
local body = os.getenv("WRK_BODY") or ""
if body ~= "" then
  wrk.body = body
end
for line in string.gmatch(os.getenv("WRK_HEADERS") or "", "[^\n]+") do
  local name, value = string.match(line, "^([^:]+):%s*(.*)$")
  if name then
    wrk.headers[name] = value
  end
end

local ports = {}
for port in string.gmatch(os.getenv("WRK_PORTS") or "", "%d+") do
  table.insert(ports, port)
end
local next_thread = 0

function setup(thread)
  if #ports > 0 then
    local port = ports[(next_thread % #ports) + 1]
    thread.addr = wrk.lookup("127.0.0.1", port)[1]
  end
  next_thread = next_thread + 1
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
