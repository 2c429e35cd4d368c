// The real @microsoft/signalr client against a hub behind token-sidecar. The client knows
// nothing about tokens: the sidecar puts them on every request.
//
//   node signalr-client.mjs DURATION_MS NAME=URL[,TRANSPORT] ...
//
// For each NAME=URL and each transport (WebSockets, ServerSentEvents, LongPolling; or the one
// named), all at once: connect, invoke Echo(n) in a loop, and when the hub closes the
// connection (its token expired) connect again, until DURATION_MS have passed. Prints one JSON
// line per client: {name, transport, ok, failed, lostAtClose, connects, connectFailures,
// closes, errors}. `lostAtClose`: invocations that failed because the hub closed the
// connection under them (in flight when the close came); `failed`: every other failure.
import * as signalR from "@microsoft/signalr";

const TRANSPORTS = {
  WebSockets: signalR.HttpTransportType.WebSockets,
  ServerSentEvents: signalR.HttpTransportType.ServerSentEvents,
  LongPolling: signalR.HttpTransportType.LongPolling,
};
const PAUSE_MS = 10;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function run(name, url, transport, deadline) {
  const stats = { name, transport, ok: 0, failed: 0, lostAtClose: 0, connects: 0, connectFailures: 0, closes: 0, errors: [] };
  const note = (e) => {
    if (stats.errors.length < 5) stats.errors.push(String(e && e.message ? e.message : e));
  };
  let n = 0;
  while (Date.now() < deadline) {
    const conn = new signalR.HubConnectionBuilder()
      .withUrl(url, { transport: TRANSPORTS[transport] })
      .configureLogging(signalR.LogLevel.None)
      .build();
    let closed = false;
    conn.onclose(() => {
      closed = true;
    });
    try {
      await conn.start();
      stats.connects++;
    } catch (e) {
      stats.connectFailures++;
      note(e);
      await sleep(50);
      continue;
    }
    // Not once the connection is on its way out (before onclose fires).
    while (!closed && conn.state === signalR.HubConnectionState.Connected && Date.now() < deadline) {
      n++;
      try {
        const r = await conn.invoke("Echo", n);
        if (r === n) stats.ok++;
        else {
          stats.failed++;
          note(`Echo(${n}) answered ${r}`);
        }
      } catch (e) {
        // The close reaches the hub connection after its transport: a send on a transport
        // that is closing fails with "not in the 'Connected' State".
        const closing = closed || conn.state !== signalR.HubConnectionState.Connected
          || /not in the 'Connected' State|error on close|connection being closed/.test(String(e && e.message));
        if (closing) stats.lostAtClose++;
        else stats.failed++;
        note(e);
      }
      await sleep(PAUSE_MS);
    }
    if (closed) stats.closes++;
    else await conn.stop().catch(note);
  }
  return stats;
}

const [duration, ...targets] = process.argv.slice(2);
const deadline = Date.now() + Number(duration);
const clients = [];
for (const t of targets) {
  const [name, rest] = t.split("=", 2);
  const [url, only] = rest.split(",");
  for (const transport of only ? [only] : Object.keys(TRANSPORTS)) {
    clients.push(run(name, url, transport, deadline));
  }
}
for (const stats of await Promise.all(clients)) {
  console.log(JSON.stringify(stats));
}
process.exit(0);
