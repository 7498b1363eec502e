// Downloads every blob of a container (in an Azure Storage account or in
// Azurite) into a local directory, one file per blob, at its blob name.
// Used by the tests to look at what a vault leaves in a bucket: every
// byte at rest, as a bucket reader sees it.
//
//   node scripts/azure-download.js BLOB_ENDPOINT ACCOUNT KEY CONTAINER DIR
//
// Needs @azure/storage-blob (`make azurite` installs it with Azurite;
// NODE_PATH=$(npm root -g)).
const path = require("path");
const fs = require("fs");
const { BlobServiceClient, StorageSharedKeyCredential } = require("@azure/storage-blob");

async function main() {
  const [endpoint, account, key, container, dir] = process.argv.slice(2);
  if (!endpoint || !account || !key || !container || !dir) {
    console.error("usage: azure-download.js BLOB_ENDPOINT ACCOUNT KEY CONTAINER DIR");
    process.exit(2);
  }
  const cred = new StorageSharedKeyCredential(account, key);
  const svc = new BlobServiceClient(`${endpoint.replace(/\/$/, "")}/${account}`, cred);
  const c = svc.getContainerClient(container);
  const root = path.resolve(dir);
  let n = 0;
  for await (const b of c.listBlobsFlat()) {
    const to = path.resolve(root, b.name);
    if (!to.startsWith(root + path.sep)) {
      throw new Error(`blob name ${JSON.stringify(b.name)} leaves ${root}`);
    }
    fs.mkdirSync(path.dirname(to), { recursive: true });
    // A blob named like a folder of others (`x.seg` beside `x.seg/0`)
    // cannot be a file there: it gets a suffix.
    const file = fs.existsSync(to) && fs.statSync(to).isDirectory() ? `${to}.blob` : to;
    await c.getBlobClient(b.name).downloadToFile(file);
    n += 1;
  }
  console.log(n);
}

main().catch((e) => {
  console.error(`azure-download.js: ${e.message}`);
  process.exit(1);
});
