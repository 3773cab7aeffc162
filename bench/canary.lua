-- Benchmark variant (d): canary-router's decision for the shipped config (envoy/plugin-config.json) in an
-- Envoy Lua filter: the client's x-version removed, the group rule, then the sticky split by FNV-1a 64 over
-- "web:" .. key (key from x-user-id, else the session cookie), 10 % to v2. LuaJIT's uint64 arithmetic
-- wraps like FNV needs. (No key: v1; the cookie assignment is left out.)
local OFFSET = 0xcbf29ce484222325ULL
local PRIME = 0x100000001b3ULL
local bxor = bit.bxor

local function bucket(key)
  local h = OFFSET
  local s = "web:" .. key
  for i = 1, #s do
    h = bxor(h, s:byte(i)) * PRIME
  end
  return tonumber(h % 10000ULL)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove("x-version")
  local version = "v1"
  local group = headers:get("x-user-group")
  if group == "beta" or group == "staff" then
    version = "v2"
  else
    local key = headers:get("x-user-id")
    if key == nil or key == "" then
      local cookie = headers:get("cookie")
      if cookie then
        key = cookie:match("session=([^;]+)")
      end
    end
    if key ~= nil and key ~= "" and bucket(key) < 1000 then
      version = "v2"
    end
  end
  headers:replace("x-version", version)
  handle:clearRouteCache()
end
