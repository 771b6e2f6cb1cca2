#!lua flags=allow-oom
-- Runs at maxmemory too: it only removes entries (and moves counters of existing channels), and it
-- is how idle history leaves a Redis that is full, so publishes can be taken again.
-- Trims a channel by age; once its stream is empty, its keys expire after retire_ms unless an
-- event arrives (a later resume then sees a new epoch: recovered false).
-- KEYS: log, meta, delivered, offered, seen   ARGV: max_events, min_t, retire_ms
local unseen, subscribed = trim(KEYS[1], KEYS[2], KEYS[3], KEYS[4], tonumber(ARGV[1]), tonumber(ARGV[2]))
local empty = redis.call('XLEN', KEYS[1]) == 0
if empty then
  for _, key in ipairs(KEYS) do
    redis.call('PEXPIRE', key, ARGV[3])
  end
end
return {unseen, subscribed, empty and 1 or 0}
