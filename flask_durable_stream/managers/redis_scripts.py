"""The Redis manager's Lua scripts: one per write, so its checks and effects are atomic."""

#: Index entries ``open`` looks at, each time, for streams Redis has deleted.
INDEX_SWEEP = 4

# An open stream's keys expire ``abandon_ms`` (lease + TTL) after the producer's last write
# (open, append, heartbeat), which renews them: a producer that died with nobody reading
# leaves nothing behind for longer than a stream that ended would.
#
# KEYS: meta, events, index, the index's sweep position. ARGV: id, token, owner ("" for
# none), now, flow ("" for none), abandon_ms, ARGV[7] and ARGV[8] (the meta key of an id is
# ARGV[7] .. id .. ARGV[8]), how many index entries to look at (INDEX_SWEEP).
# Before adding the id to the index, looks at that many of its entries from the sweep position
# on and drops those whose stream Redis has deleted (expired): the index stays about as long
# as the streams that exist, with no gc job.
_OPEN = """
local expires = redis.call('HGET', KEYS[1], 'expires_at')
if redis.call('EXISTS', KEYS[1]) == 1 then
  if expires == false or expires == '' or tonumber(expires) > tonumber(ARGV[4]) then
    return 0
  end
  redis.call('DEL', KEYS[1], KEYS[2])
end
local at = tonumber(redis.call('GET', KEYS[4]) or '0')
local n = tonumber(ARGV[9])
local ids = redis.call('ZRANGE', KEYS[3], at, at + n - 1)
local dropped = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[7] .. id .. ARGV[8]) == 0 then
    redis.call('ZREM', KEYS[3], id)
    dropped = dropped + 1
  end
end
if #ids < n then at = 0 else at = at + n - dropped end
redis.call('SET', KEYS[4], at)
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'status', 'open', 'owner', ARGV[3],
  'created_at', ARGV[4], 'updated_at', ARGV[4], 'heartbeat_at', ARGV[4], 'expires_at', '',
  'cancel', '0', 'last_seq', '-1', 'flow', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
"""

# KEYS: meta, events. ARGV: token, now, ttl_ms, expires_at, terminal_status ('' if none),
# first_seq, abandon_ms, then kind, payload pairs. Returns 'ok' ('cancel' where the cancel
# flag is raised: the append refreshed the lease, a heartbeat's work), 'gone', 'ended' or
# 'conflict'.
_APPEND = """
local meta = redis.call('HMGET', KEYS[1], 'token', 'status', 'last_seq', 'cancel')
if meta[1] == false or meta[1] ~= ARGV[1] then return 'gone' end
local ok = 'ok'
if meta[4] == '1' then ok = 'cancel' end
local last = tonumber(meta[3])
local first = tonumber(ARGV[6])
local count = (#ARGV - 7) / 2
local stored = math.max(0, math.min(count, last + 1 - first))
if stored > 0 then
  local have = redis.call('XRANGE', KEYS[2], '0-' .. (first + 1), '0-' .. (first + stored))
  if #have ~= stored then return 'conflict' end
  for i = 1, stored do
    local fields = have[i][2]
    if fields[2] ~= ARGV[6 + 2 * i] or fields[4] ~= ARGV[7 + 2 * i] then return 'conflict' end
  end
end
if stored == count then
  redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[2])
  if meta[2] == 'open' then
    redis.call('PEXPIRE', KEYS[1], ARGV[7])
    redis.call('PEXPIRE', KEYS[2], ARGV[7])
  end
  return ok
end
if meta[2] ~= 'open' then return 'ended' end
for i = stored + 1, count do
  redis.call('XADD', KEYS[2], '0-' .. (first + i), 'k', ARGV[6 + 2 * i], 'p', ARGV[7 + 2 * i])
end
local seq = first + count - 1
redis.call('HSET', KEYS[1], 'last_seq', seq, 'updated_at', ARGV[2], 'heartbeat_at', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'status', ARGV[5], 'expires_at', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
return ok
"""

# KEYS: meta, events. ARGV: token, now, abandon_ms. Returns 1 (cancel requested), 0, or -1
# (not this producer's).
_HEARTBEAT = """
local meta = redis.call('HMGET', KEYS[1], 'token', 'status', 'cancel')
if meta[1] == false or meta[1] ~= ARGV[1] or meta[2] ~= 'open' then return -1 end
redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return tonumber(meta[3])
"""

# KEYS: meta. ARGV: now. Returns 1 (raised), 0 (already ended) or -1 (unknown/expired).
_CANCEL = """
local meta = redis.call('HMGET', KEYS[1], 'status', 'expires_at')
if meta[1] == false then return -1 end
if meta[2] ~= '' and tonumber(meta[2]) <= tonumber(ARGV[1]) then return -1 end
if meta[1] ~= 'open' then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1', 'updated_at', ARGV[1])
return 1
"""

# KEYS: meta, events. ARGV: token, last_seq seen, now, lease, payload, ttl_ms, expires_at.
# Ends the stream with the "producer lost" event only if it is still open, at the same
# seq, and its heartbeat is still stale. Returns 1 if it did.
_MARK_LOST = """
local meta = redis.call('HMGET', KEYS[1], 'token', 'status', 'last_seq', 'heartbeat_at')
if meta[1] == false or meta[1] ~= ARGV[1] or meta[2] ~= 'open' then return 0 end
if meta[3] ~= ARGV[2] then return 0 end
if tonumber(meta[4]) + tonumber(ARGV[4]) >= tonumber(ARGV[3]) then return 0 end
local seq = tonumber(meta[3]) + 1
redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 'k', 'error', 'p', ARGV[5])
redis.call('HSET', KEYS[1], 'last_seq', seq, 'status', 'error', 'updated_at', ARGV[3],
  'expires_at', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 1
"""

# KEYS: pointer. ARGV: stream id. Deletes the pointer only if it still names that stream.
_CLEAR_POINTER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
