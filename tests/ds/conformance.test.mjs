// The official Durable Streams server conformance suite, against the server at DS_URL.
import { describe } from "vitest"
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

describe("server", () => {
  runConformanceTests({ baseUrl: process.env.DS_URL })
})
