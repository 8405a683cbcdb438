// Validates webhook payloads against GitHub's published schemas (@octokit/webhooks-schemas).
// Reads one JSON object per line on stdin, {"event": "pull_request", "payload": {...}}, and
// answers each with one line: "ok", or "invalid: " and what the schema refused. The payload is
// checked against the schema of its event and action (`pull_request$synchronize`, `ping$event`).
import { createRequire } from "node:module";
import { createInterface } from "node:readline";

const require = createRequire(import.meta.url);
const schema = require("@octokit/webhooks-schemas");
const Ajv = require("ajv");
const addFormats = require("ajv-formats");

const ajv = new Ajv({ strict: true, allErrors: true });
addFormats(ajv);
ajv.addKeyword("tsAdditionalProperties");
ajv.addSchema(schema, "webhooks");

function check(event, payload) {
  const name = payload && typeof payload.action === "string" ? `${event}$${payload.action}` : `${event}$event`;
  if (!schema.definitions[name]) {
    return `invalid: GitHub's schemas have no ${name}`;
  }
  const validate = ajv.getSchema(`webhooks#/definitions/${name}`);
  if (validate(payload)) {
    return "ok";
  }
  const errors = validate.errors.map((e) => `${e.instancePath || "/"} ${e.message} ${JSON.stringify(e.params)}`);
  return `invalid: ${name}: ${errors.join("; ")}`;
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    const { event, payload } = JSON.parse(line);
    answer = check(event, payload);
  } catch (err) {
    answer = `invalid: ${err.message}`;
  }
  process.stdout.write(answer.replace(/\n/g, " ") + "\n");
}
