// Polar's own strategies (@polar-sh/ingestion) on the scenarios of
// tests/ingest/sdk/test_polar_ingestion_compat.py: the same recorded LLM endpoint, S3 server and
// streams as meterline's strategies there. Polar's client sends its events to the test's capture
// server; each scenario's customer is "polar:<scenario>".
//
//   node run.mjs '{"ingest": URL, "llm": URL, "s3": URL}'
import { once } from "node:events";
import { Readable, Writable } from "node:stream";

import { createAnthropic } from "@ai-sdk/anthropic";
import { createOpenAI } from "@ai-sdk/openai";
import {
  CreateBucketCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  GetObjectCommand,
  HeadObjectCommand,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
} from "@aws-sdk/client-s3";
import { Ingestion } from "@polar-sh/ingestion";
import { DeltaTimeStrategy } from "@polar-sh/ingestion/strategies/DeltaTime";
import { LLMStrategy } from "@polar-sh/ingestion/strategies/LLM";
import { S3Strategy } from "@polar-sh/ingestion/strategies/S3";
import { StreamStrategy } from "@polar-sh/ingestion/strategies/Stream";
import { generateText, streamText } from "ai";

const urls = JSON.parse(process.argv[2]);
const polar = Ingestion({ accessToken: "polar_oat_compat", serverURL: urls.ingest });
const customer = (scenario) => ({ externalCustomerId: `polar:${scenario}` });
const ASK = "What is usage-based billing?";

const openai = createOpenAI({ baseURL: `${urls.llm}/v1`, apiKey: "k" });
const anthropic = createAnthropic({ baseURL: `${urls.llm}/v1`, apiKey: "k" });

async function llm(scenario, model, { stream = false, headers } = {}) {
  const measured = polar.strategy(new LLMStrategy(model)).ingest("llm").client(customer(scenario));
  if (!stream) {
    await generateText({ model: measured, prompt: ASK, headers });
    return;
  }
  const result = streamText({ model: measured, prompt: ASK, headers, onError: () => {} });
  for await (const _part of result.fullStream) {
    // read to the end, as a caller showing the text would
  }
}

const s3 = new S3Client({
  endpoint: urls.s3,
  region: "us-east-1",
  forcePathStyle: true,
  credentials: { accessKeyId: "k", secretAccessKey: "s" },
});

function s3Strategy() {
  return polar.strategy(new S3Strategy(s3)).ingest("s3.upload");
}

async function s3Scenarios() {
  await s3.send(new CreateBucketCommand({ Bucket: "polar" }));
  let client = s3Strategy().client(customer("s3.put"));
  await client.send(
    new PutObjectCommand({
      Bucket: "polar",
      Key: "a.txt",
      Body: Buffer.alloc(1000, "x"),
      ContentType: "text/plain",
    }),
  );
  // Every client() adds its middleware to the one S3Client: from here on, each request
  // is also counted for every earlier customer. Each scenario gets its own client.
  const fresh = () =>
    new S3Client({
      endpoint: urls.s3,
      region: "us-east-1",
      forcePathStyle: true,
      credentials: { accessKeyId: "k", secretAccessKey: "s" },
    });
  const strategyOn = (raw) => polar.strategy(new S3Strategy(raw)).ingest("s3.upload");

  client = strategyOn(fresh()).client(customer("s3.get"));
  await (await client.send(new GetObjectCommand({ Bucket: "polar", Key: "a.txt" }))).Body.transformToByteArray();
  client = strategyOn(fresh()).client(customer("s3.head"));
  await client.send(new HeadObjectCommand({ Bucket: "polar", Key: "a.txt" }));

  client = strategyOn(fresh()).client(customer("s3.multipart"));
  const upload = await client.send(
    new CreateMultipartUploadCommand({ Bucket: "polar", Key: "d.bin", ContentType: "video/mp4" }),
  );
  const parts = [];
  for (const [number, size] of [
    [1, 5 * 1024 * 1024],
    [2, 1000],
  ]) {
    const answer = await client.send(
      new UploadPartCommand({
        Bucket: "polar",
        Key: "d.bin",
        UploadId: upload.UploadId,
        PartNumber: number,
        Body: Buffer.alloc(size, "m"),
      }),
    );
    parts.push({ PartNumber: number, ETag: answer.ETag });
  }
  await client.send(
    new CompleteMultipartUploadCommand({
      Bucket: "polar",
      Key: "d.bin",
      UploadId: upload.UploadId,
      MultipartUpload: { Parts: parts },
    }),
  );

  client = strategyOn(fresh()).client(customer("s3.stream_body"));
  await client.send(
    new PutObjectCommand({
      Bucket: "polar",
      Key: "s.bin",
      Body: Readable.from([Buffer.alloc(2000, "s"), Buffer.alloc(3000, "s")]),
      ContentLength: 5000,
    }),
  );

  const shared = strategyOn(fresh());
  shared.client(customer("s3.other_request"));
  client = shared.client(customer("s3.client_twice"));
  await client.send(
    new PutObjectCommand({ Bucket: "polar", Key: "t.txt", Body: Buffer.alloc(10, "t") }),
  );
}

async function streamScenarios() {
  const drain = async (readable) => {
    for await (const _chunk of readable) {
      // consume
    }
  };
  const read = (scenario, chunks) =>
    drain(
      polar
        .strategy(new StreamStrategy(Readable.from(chunks)))
        .ingest("stream.bytes")
        .client(customer(scenario)),
    );
  await read("stream.binary", [Buffer.alloc(300, "r"), Buffer.alloc(700, "r")]);
  await read("stream.text", ["héllo\n", "wörld 😀\n"]);
  const writable = new Writable({ write: (_chunk, _encoding, done) => done() });
  const measured = polar
    .strategy(new StreamStrategy(writable))
    .ingest("stream.bytes")
    .client(customer("stream.writable"));
  measured.write(Buffer.alloc(20, "w"));
  measured.end();
  await once(measured, "finish");
}

function deltaScenarios() {
  const ticks = [1000, 1250.5];
  const fake = polar
    .strategy(new DeltaTimeStrategy(() => ticks.shift()))
    .ingest("compute")
    .client(customer("delta.fake_clock"));
  fake()();
  // The clock Polar's docs use.
  const real = polar
    .strategy(new DeltaTimeStrategy(() => performance.now()))
    .ingest("compute")
    .client(customer("delta.documented_clock"));
  const stop = real();
  const until = performance.now() + 50;
  while (performance.now() < until) {
    // 50 ms of work
  }
  stop();
}

await llm("llm.openai.chat", openai.chat("gpt-4o-mini"));
await llm("llm.openai.chat.no_total", openai.chat("gpt-4o-mini"), {
  headers: { "x-recorded-without-total": "1" },
});
await llm("llm.openai.chat.stream", openai.chat("gpt-4o-mini"), { stream: true });
await llm("llm.openai.responses", openai.responses("gpt-4.1-mini"));
await llm("llm.openai.responses.stream", openai.responses("gpt-4.1-mini"), { stream: true });
await llm("llm.anthropic", anthropic.messages("claude-haiku-4-5"));
await llm("llm.anthropic.stream", anthropic.messages("claude-haiku-4-5"), { stream: true });
await llm("llm.anthropic.cut", anthropic.messages("claude-haiku-4-5"), {
  stream: true,
  headers: { "x-recorded-cut-after": "2" },
});
await s3Scenarios();
await streamScenarios();
deltaScenarios();
// The S3, stream and delta-time strategies send without being awaited: let them finish.
await new Promise((resolve) => setTimeout(resolve, 1000));
