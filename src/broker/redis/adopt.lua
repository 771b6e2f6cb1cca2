#!lua
-- Declared (a shebang, no allow-oom): at maxmemory it is refused whole, and retried next tick.
-- Moves up to ARGV[3] held events out of the journal of a replica whose heartbeat stopped (KEYS[2])
-- into this replica's (KEYS[3]), oldest first, each keeping its first entry id as `origin`.
-- Removes the dead replica from the heartbeats (KEYS[1]) once its journal is empty. Nothing is
-- moved if its heartbeat came back meanwhile.
-- ARGV: dead replica, now_ms, count, this replica's heartbeat (expiry ms), this replica
-- Returns {new id, run, event, origin, producer or absent} per moved event.
local alive, dead, mine = KEYS[1], KEYS[2], KEYS[3]
local beat = redis.call('ZSCORE', alive, ARGV[1])
if beat and tonumber(beat) >= tonumber(ARGV[2]) then
  return {}
end
redis.call('ZADD', alive, ARGV[4], ARGV[5])
local moved = {}
for _, entry in ipairs(redis.call('XRANGE', dead, '-', '+', 'COUNT', ARGV[3])) do
  local fields = {}
  for i = 1, #entry[2], 2 do
    fields[entry[2][i]] = entry[2][i + 1]
  end
  local origin = fields['origin'] or entry[1]
  local run, event = fields['run'] or '', fields['event'] or ''
  local id
  local producer = fields['producer']
  if producer then
    id = redis.call('XADD', mine, '*', 'run', run, 'event', event, 'origin', origin, 'producer', producer)
    table.insert(moved, {id, run, event, origin, producer})
  else
    id = redis.call('XADD', mine, '*', 'run', run, 'event', event, 'origin', origin)
    table.insert(moved, {id, run, event, origin})
  end
  redis.call('XDEL', dead, entry[1])
end
if redis.call('XLEN', dead) == 0 then
  redis.call('DEL', dead)
  redis.call('ZREM', alive, ARGV[1])
end
return moved
