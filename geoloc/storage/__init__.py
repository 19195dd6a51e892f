"""Object storage (S3 via boto3), below `data/`: the S3 source and the image store read from it."""
