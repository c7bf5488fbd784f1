-- wrk script: POST the file named by $KILN_BODY as JSON to the URL given to wrk.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("KILN_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
