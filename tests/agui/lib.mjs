// Shared by the harness scripts: argument parsing, captured warnings, one JSON line on stdout.

/** Parses `--name value` pairs and bare `--flag`s; repeatable names collect into arrays. */
export function parseArgs(argv, { repeatable = [], flags = [] } = {}) {
  const out = {};
  for (const name of repeatable) out[name] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith("--")) throw new Error(`unexpected argument '${arg}'`);
    const name = arg.slice(2);
    if (flags.includes(name)) {
      out[name] = true;
      continue;
    }
    if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
    const value = argv[++i];
    if (repeatable.includes(name)) out[name].push(value);
    else out[name] = value;
  }
  return out;
}

/** `Name: value` strings to a headers object. */
export function headerObject(lines) {
  const headers = {};
  for (const line of lines) {
    const at = line.indexOf(":");
    if (at <= 0) throw new Error(`--header takes 'Name: value', got '${line}'`);
    headers[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return headers;
}

/**
 * Collects what the client library says on console.warn / console.error (the enforcement
 * stage warns there when it strips unknown fields or drops unknown events), so the result can
 * carry it and stdout stays one JSON object.
 */
export function captureConsole() {
  const said = [];
  for (const level of ["warn", "error", "log", "info", "debug"]) {
    console[level] = (...parts) => {
      said.push(
        parts.map((p) => (p instanceof Error ? p.message : typeof p === "string" ? p : JSON.stringify(p))).join(" "),
      );
    };
  }
  return said;
}

export function finish(result) {
  process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
}

export function errorText(error) {
  if (error instanceof Error) {
    const cause = error.cause instanceof Error ? ` (${error.cause.message})` : "";
    return `${error.name === "Error" ? "" : error.name + ": "}${error.message}${cause}`;
  }
  return String(error);
}
