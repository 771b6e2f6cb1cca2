#!lua flags=allow-oom
-- Runs at maxmemory too: it only removes an entry of the index.
-- Removes a channel from the index only if no publish touched it since the sweep read it as idle.
-- KEYS: aw:channels   ARGV: channel, idle_before_ms
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
