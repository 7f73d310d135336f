-- The wrk script of benches/http_load.sh: POST /charge of
-- examples/axum_service, one `Idempotency-Key` per request.
--
-- Environment (set by http_load.sh):
--   MODE=fresh   every request a new key: "<KEY_PREFIX>-<thread>-<n>",
--                n counting the thread's requests from 0
--   MODE=replay  the keys cycle over n = 1 .. REPLAY_KEYS of each thread,
--                which a fresh run with the same KEY_PREFIX completed (not
--                n = 0: wrk calls `request` once on thread 1 before the
--                run to check it, so thread 1's key 0 is never sent)
--   USERS        the key's user (its bearer token) is "user<n % USERS>",
--                so a replay comes from the key's own user
--
-- Every response is checked: `done` prints one line
--   RESULT mode=.. requests=.. rps=.. p50_us=.. p99_us=.. responses=..
--          non2xx=.. replayed=.. socket_errors=..
-- where `replayed` counts responses with `Idempotent-Replayed: true`.

local mode = os.getenv("MODE") or "fresh"
local prefix = os.getenv("KEY_PREFIX") or "k"
local replay_keys = tonumber(os.getenv("REPLAY_KEYS") or "1000")
local users = tonumber(os.getenv("USERS") or "64")
local body = '{"amount":1000}'

-- In the main Lua state: the threads, numbered 1, 2, ... in creation order.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

-- In each thread's Lua state (`id` was set by `setup`).
function init(args)
  n = 0
  responses = 0
  non2xx = 0
  replayed = 0
end

function request()
  local k = n
  n = n + 1
  if mode == "replay" then
    k = k % replay_keys + 1
  end
  return wrk.format("POST", "/charge", {
    ["Authorization"] = "Bearer user" .. (k % users),
    ["Idempotency-Key"] = '"' .. prefix .. "-" .. id .. "-" .. k .. '"',
    ["Content-Type"] = "application/json",
  }, body)
end

function response(status, headers, _)
  responses = responses + 1
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
  local marker = headers["idempotent-replayed"] or headers["Idempotent-Replayed"]
  if marker == "true" then
    replayed = replayed + 1
  end
end

function done(summary, latency, _)
  local got, bad, again = 0, 0, 0
  for _, thread in ipairs(threads) do
    got = got + thread:get("responses")
    bad = bad + thread:get("non2xx")
    again = again + thread:get("replayed")
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT mode=%s requests=%d rps=%.0f p50_us=%d p99_us=%d responses=%d non2xx=%d replayed=%d socket_errors=%d\n",
    mode, summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), got, bad, again,
    e.connect + e.read + e.write + e.timeout))
end
