// Reads a JSON Durable Stream with the official client, the way an application would.
//   node flow_reader.mjs <url> <offset> <live> <stopAfter>
// Prints one JSON line: {"items": [...], "offset": "<offset after the last batch>", "closed": bool}.
// With stopAfter > 0 it cancels the session (dropping its connection) once it holds at
// least that many items; otherwise it reads until the stream is closed.
import { stream } from "@durable-streams/client"

const [url, offset, live, stopAfterText] = process.argv.slice(2)
const stopAfter = Number(stopAfterText)
const items = []
let last = offset
let closed = false

const res = await stream({ url, offset, live, json: true })
await new Promise((resolve, reject) => {
  res.subscribeJson(async (batch) => {
    items.push(...batch.items)
    last = batch.offset
    closed = batch.streamClosed
    if (closed || (stopAfter > 0 && items.length >= stopAfter)) {
      res.cancel()
      resolve()
    }
  })
  // The session may end before its last batch is delivered: only the batch with
  // streamClosed (or the stop condition) ends the read.
  res.closed.catch(reject)
})
process.stdout.write(JSON.stringify({ items, offset: last, closed }) + "\n")
process.exit(0)
