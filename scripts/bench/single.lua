wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"type":"page_view","user":"u-1234","path":"/pricing","ms":42}'
