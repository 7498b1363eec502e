// Creates a blob container (if missing) in an Azure Storage account or in
// Azurite. Used by the tests and `make demo-cloud`, which start Azurite:
// coffre itself expects its container to exist, as operators create them.
//
//   node scripts/azure-container.js BLOB_ENDPOINT ACCOUNT KEY CONTAINER...
//
// Needs @azure/storage-blob (`make azurite` installs it with Azurite;
// NODE_PATH=$(npm root -g)).
const { BlobServiceClient, StorageSharedKeyCredential } = require("@azure/storage-blob");

async function main() {
  const [endpoint, account, key, ...containers] = process.argv.slice(2);
  if (!endpoint || !account || !key || containers.length === 0) {
    console.error("usage: azure-container.js BLOB_ENDPOINT ACCOUNT KEY CONTAINER...");
    process.exit(2);
  }
  const cred = new StorageSharedKeyCredential(account, key);
  const svc = new BlobServiceClient(`${endpoint.replace(/\/$/, "")}/${account}`, cred);
  for (const c of containers) {
    await svc.getContainerClient(c).createIfNotExists();
  }
}

main().catch((e) => {
  console.error(`azure-container.js: ${e.message}`);
  process.exit(1);
});
