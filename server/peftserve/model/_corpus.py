"""A few KB of plain English the embedded byte-level tokenizer is trained on (kept in code so it ships)."""

CORPUS = """\
The river ran quietly past the old mill, where the water wheel had not turned for many years.
In the morning the fishermen walked down to the bank with their nets and their small wooden boats.
Children played in the fields behind the houses, and their voices carried over the hills.
A language model reads a sequence of tokens and predicts the next one, one step at a time.
The server keeps one frozen base model in memory and applies a small adapter for each request.
Each adapter changes only a few numbers, so thousands of them can share the same large model.
When many requests arrive at once, the engine packs their tokens into a single batch.
The scheduler decides which requests run in the next step, under budgets for memory and time.
Keys and values from earlier tokens are kept in a cache, divided into blocks of equal size.
When a request finishes, its blocks are freed and given to the next request that is waiting.
Good software is simple to read, easy to test, and honest about the errors it cannot handle.
A clear error message tells the user what went wrong and what they should do to fix it.
She opened the window and looked at the garden, where the roses had started to bloom.
The weather was warm for early spring, and the birds were building their nests in the trees.
He wrote a letter to his brother, who lived in a city far away on the other side of the sea.
Every evening the family gathered around the table to share a meal and talk about the day.
Numbers such as 1, 2, 3, 10, 42, 100, 256, 1024 and 2048 appear often in programs and papers.
The quick brown fox jumps over the lazy dog; the five boxing wizards jump quickly.
Questions are welcome: what is the capital of France? Paris is the capital of France.
How many days are in a week? There are seven days in a week, and twelve months in a year.
The teacher asked the students to read the first chapter of the book before the next class.
Science begins with careful observation, a question, and an experiment that can be repeated.
A computer follows instructions exactly, which is both its greatest strength and its weakness.
Memory is fast but small, disks are large but slow, and networks connect machines together.
The library was quiet except for the sound of pages turning and the soft hum of the lights.
After the storm, the streets were covered with leaves, and the air smelled fresh and clean.
Travelers crossed the mountains in summer, when the snow had melted from the high passes.
The market was full of fresh bread, cheese, apples, onions, and baskets of bright flowers.
Music filled the hall as the orchestra began to play, and the audience fell silent.
We trained the model on a small dataset, measured its accuracy, and compared it to the baseline.
Training updates the weights with gradients; inference only runs the forward pass.
A matrix multiplication takes two tables of numbers and produces a third one.
Attention lets each token look at every earlier token and weigh how much each one matters.
The cat slept in the sun by the door, and the dog waited patiently for its dinner.
Farmers planted wheat and corn in the spring and harvested the crops in the autumn.
The bridge connected the two halves of the town, and people crossed it every day to work.
Please write your name, your address, and the date at the top of the first page.
The meeting started at nine o'clock and ended just before noon, with a short break for coffee.
Thank you for your help; I could not have finished the project without your advice.
In the end, the best plan was the simplest one, and everyone agreed that it worked well.
Light travels faster than sound, which is why we see the lightning before we hear the thunder.
The ocean covers most of the surface of the earth and holds most of its water.
Stars are distant suns, and some of them have planets that circle around them as ours do.
The doctor said that sleep, water, good food and a daily walk are the best medicine.
Stories have a beginning, a middle, and an end, and the best ones surprise us along the way.
The engineers tested the new version of the system before they released it to the users.
If the queue is full, the server tells the client to try again later instead of waiting forever.
Every request has an identifier, a prompt, and a limit on how many new tokens it may produce.
Greedy decoding picks the most likely token; sampling draws one from the distribution.
Temperature makes the distribution sharper or flatter, and top p keeps only the likely tokens.
"""
