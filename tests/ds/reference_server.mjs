// The Node reference server (@durable-streams/server), for side-by-side runs.
//   node reference_server.mjs <port> [dataDir]   (in-memory without dataDir)
import { DurableStreamTestServer } from "@durable-streams/server"

const [port, dataDir] = process.argv.slice(2)
const server = new DurableStreamTestServer({
  port: Number(port),
  host: "127.0.0.1",
  ...(dataDir ? { dataDir } : {}),
})
const url = await server.start()
process.stdout.write(url + "\n")
const stop = async () => {
  await server.stop()
  process.exit(0)
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
