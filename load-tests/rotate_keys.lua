-- wrk script: every request carries the next key of a list in `x-api-key`.
--
--   wrk -t1 -c64 -d10s -s rotate_keys.lua http://127.0.0.1:18101/v1/orders -- keys.txt
--
-- keys.txt holds one raw key per line. The requests are formatted once in init()
-- so the load generator spends no time building them during the run. Each wrk
-- thread starts at its own offset. done() prints one line, `WRKJSON {...}`, that
-- compare.py parses (latencies in microseconds).

local requests = {}
local next_index = 1

function init(args)
   local file = args[1]
   if file == nil then
      error("usage: wrk ... -s rotate_keys.lua URL -- <keys file>")
   end
   for line in io.lines(file) do
      if #line > 0 then
         requests[#requests + 1] = wrk.format(nil, nil, { ["x-api-key"] = line })
      end
   end
   if #requests == 0 then
      error("no keys in " .. file)
   end
   math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0))
   next_index = math.random(#requests)
end

function request()
   local r = requests[next_index]
   next_index = next_index + 1
   if next_index > #requests then
      next_index = 1
   end
   return r
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,'
         .. '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,'
         .. '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_p999_us":%d,"lat_max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max))
end
