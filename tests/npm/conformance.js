// Drives the local fabric with Apache's official OpenWhisk JavaScript client
// and prints what it got back as one JSON object, for the pytest test to judge.
// Usage: FABRIC_URL=http://127.0.0.1:PORT FABRIC_AUTH=uuid:key ACTION_ZIP=/path.zip node conformance.js
'use strict'
const fs = require('fs')
const openwhisk = require('openwhisk')

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

async function main () {
  const ow = openwhisk({ apihost: process.env.FABRIC_URL, api_key: process.env.FABRIC_AUTH })
  const name = process.env.ACTION_NAME || 'npm-conformance'
  const zip = fs.readFileSync(process.env.ACTION_ZIP)
  const out = {}

  const created = await ow.actions.create({
    name, action: zip, kind: 'python:3', overwrite: true,
    params: { bound: 'b' }, limits: { timeout: 10000, memory: 256 }
  })
  out.created = { name: created.name, version: created.version, kind: created.exec.kind, binary: created.exec.binary }

  try {
    await ow.actions.create({ name, action: zip, kind: 'python:3' })
    out.createAgain = { status: 200 }
  } catch (err) {
    out.createAgain = { status: err.statusCode, error: err.error && err.error.error }
  }

  const got = await ow.actions.get({ name })
  out.got = { name: got.name, parameters: got.parameters, limits: got.limits }

  const nb = await ow.actions.invoke({ name, params: { x: 1 } })
  out.nonBlocking = nb

  let rec = null
  for (let i = 0; i < 500 && rec === null; i++) {
    try {
      rec = await ow.activations.get({ activationId: nb.activationId })
    } catch (err) {
      if (err.statusCode !== 404) throw err
      await sleep(10)
    }
  }
  out.activation = rec

  out.blocking = await ow.actions.invoke({ name, blocking: true, params: { x: 2 } })
  out.blockingResult = await ow.actions.invoke({ name, blocking: true, result: true, params: { x: 3 } })

  try {
    await ow.actions.invoke({ name, blocking: true, params: { fail: true } })
    out.blockingFailure = { status: 200 }
  } catch (err) {
    out.blockingFailure = { status: err.statusCode, response: err.error && err.error.response }
  }

  out.list = await ow.activations.list({ name, limit: 10, docs: true })
  out.listSummary = await ow.activations.list({ name, limit: 2 })

  out.deleted = (await ow.actions.delete({ name })).name
  try {
    await ow.actions.get({ name })
    out.afterDelete = { status: 200 }
  } catch (err) {
    out.afterDelete = { status: err.statusCode }
  }
  process.stdout.write(JSON.stringify(out))
}

main().catch(err => {
  process.stderr.write(`conformance run failed: ${err && err.stack ? err.stack : err}\n`)
  process.exit(1)
})
