-- wrk script: POST a fixed non-stream chat completion and print a machine-readable summary.
-- Environment: BENCH_KEY (optional Bearer key), BENCH_MAX_REQUESTS (optional: stop each thread after
-- that many responses; run wrk with -t1 so the cap is exact up to the connections still in flight).

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = '{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello"}]}'
wrk.headers["Content-Type"] = "application/json"

local key = os.getenv("BENCH_KEY")
if key and key ~= "" then
   wrk.headers["Authorization"] = "Bearer " .. key
end

local limit = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "") or 0
if limit > 0 then
   -- defining response() makes wrk parse every response, so only do it when a cap is asked for
   local seen = 0
   function response(status, headers, body)
      seen = seen + 1
      if seen == limit then
         wrk.thread:stop()
         -- bench/loadgen.py waits for this line, then stops wrk's sleeping main thread with SIGINT
         io.write("BENCH_LIMIT_REACHED\n")
         io.flush()
      end
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
      '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%.1f,"max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
      latency.mean, latency.max))
end
