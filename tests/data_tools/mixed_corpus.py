"""A small mixed-language instruction corpus for the quality-filter tests, written by hand for them."""

import random

ENGLISH = [
    ("Why is the sky blue?", "Sunlight scatters off the molecules in the air, and blue light scatters the most."),
    ("What does a thermometer measure?", "It measures temperature, usually in degrees Celsius or Fahrenheit."),
    ("Give me a tip for sleeping better.", "Go to bed at the same time every night and keep your room dark and cool."),
    ("How many days are in a leap year?", "A leap year has 366 days, one more than a common year."),
    ("What is the capital of France?", "The capital of France is Paris, which is also its largest city."),
    ("Explain what a noun is.", "A noun is a word that names a person, a place, a thing or an idea."),
    (
        "Why do we need to drink water?",
        "Our bodies use water to control temperature, carry nutrients and remove waste.",
    ),
    ("What is photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar."),
    ("Suggest a name for a friendly dog.", "You could call your dog Buddy, because it sounds warm and playful."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest and deepest ocean on our planet."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote the play near the end of the sixteenth century."),
    (
        "What causes the seasons?",
        "The seasons change because the axis of the Earth is tilted as it goes around the sun.",
    ),
    ("How can I save money each month?", "Write down what you spend, set a budget and put a small amount aside first."),
    (
        "Describe a rainbow in one sentence.",
        "A rainbow is an arc of colours that appears when sunlight shines through rain.",
    ),
    ("What is the boiling point of water?", "At sea level, water boils at one hundred degrees Celsius."),
    (
        "Why do leaves change colour in autumn?",
        "The green chlorophyll breaks down, so the yellow and red pigments show through.",
    ),
    (
        "What is a good way to learn a new language?",
        "Practise a little every day, listen to native speakers and read simple books.",
    ),
    (
        "How does a bicycle stay upright?",
        "The rider steers into the fall, and the moving wheels help keep the bike balanced.",
    ),
    ("What is the job of the heart?", "The heart pumps blood through the body, carrying oxygen to every organ."),
    ("Name three primary colours.", "The three primary colours of paint are red, yellow and blue."),
    ("What is a volcano?", "A volcano is an opening in the crust of the Earth where hot melted rock comes out."),
    ("Why should I wash my hands?", "Washing your hands removes germs and helps stop illness from spreading."),
    (
        "What is the difference between weather and climate?",
        "Weather is what happens today, while climate is the pattern over many years.",
    ),
    (
        "How do bees make honey?",
        "Bees collect nectar from flowers and store it in the hive until it thickens into honey.",
    ),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain above sea level."),
    ("Give me an idea for a quick dinner.", "Try a vegetable stir fry with rice; it is ready in about twenty minutes."),
    ("Why is exercise good for you?", "Exercise makes your heart and muscles stronger and can improve your mood."),
    (
        "What does a librarian do?",
        "A librarian helps people find books and information and looks after the collection.",
    ),
    ("How far away is the moon?", "The moon is about three hundred and eighty thousand kilometres from the Earth."),
    ("What is the main language spoken in Brazil?", "Most people in Brazil speak Portuguese."),
    (
        "How should I start writing an essay?",
        "Begin with a clear question, make a short plan and then write a simple first draft.",
    ),
    (
        "What is gravity?",
        "Gravity is the force that pulls objects toward each other, like an apple falling to the ground.",
    ),
    ("Why do cats purr?", "Cats often purr when they are relaxed, but they may also purr to calm themselves."),
    ("What is a healthy breakfast?", "Oatmeal with fruit and a glass of milk is a healthy way to start the day."),
    ("How do airplanes fly?", "The wings push air down as the plane moves forward, and that creates lift."),
    (
        "What is the purpose of a seat belt?",
        "A seat belt holds you in place and protects you if the car stops suddenly.",
    ),
    (
        "Tell me a fact about elephants.",
        "Elephants are the largest land animals, and they can remember places for years.",
    ),
    ("Why do we have time zones?", "The Earth turns, so noon comes at different times in different places."),
    ("What is recycling?", "Recycling turns used materials such as paper and glass into new products."),
    (
        "How can I become a better listener?",
        "Look at the speaker, do not interrupt and ask questions about what they said.",
    ),
    ("What is the speed of light?", "Light travels at about three hundred thousand kilometres per second."),
]

OTHER = {
    "fr": [
        ("Quelle est la capitale de l'Italie ?", "La capitale de l'Italie est Rome, une ville très ancienne."),
        ("Pourquoi faut-il dormir ?", "Le sommeil permet au corps de se reposer et au cerveau de trier les souvenirs."),
        ("Comment faire une omelette ?", "Battez trois oeufs, versez-les dans une poêle chaude avec un peu de beurre."),
        ("Que mange un chat ?", "Un chat mange surtout de la viande et du poisson, et il boit de l'eau fraîche."),
        ("Donne-moi un conseil pour apprendre.", "Travaillez un peu chaque jour et relisez vos notes le soir."),
        ("Pourquoi la mer est-elle salée ?", "Les rivières apportent des sels minéraux qui restent dans la mer."),
    ],
    "de": [
        (
            "Wie spät ist es in Berlin?",
            "Das kann ich nicht sehen, aber Berlin liegt in der mitteleuropäischen Zeitzone.",
        ),
        ("Was ist ein Fluss?", "Ein Fluss ist ein großes fließendes Gewässer, das meistens ins Meer mündet."),
        ("Wie backe ich Brot?", "Mische Mehl, Wasser, Salz und Hefe, lass den Teig gehen und backe ihn im Ofen."),
        ("Warum ist Sport gesund?", "Sport stärkt das Herz und die Muskeln und hilft gegen Stress."),
        ("Wer hat Faust geschrieben?", "Johann Wolfgang von Goethe hat das Drama Faust geschrieben."),
        ("Was macht eine Ärztin?", "Eine Ärztin untersucht kranke Menschen und hilft ihnen, wieder gesund zu werden."),
    ],
    "es": [
        ("¿Cuál es el río más largo de España?", "El río más largo de España es el Tajo, que llega hasta Portugal."),
        ("¿Por qué llueve?", "El agua del mar se evapora, forma nubes y luego cae como lluvia."),
        ("¿Cómo se hace una tortilla?", "Se fríen patatas y cebolla, se mezclan con huevos batidos y se cuaja todo."),
        ("Dame un consejo para estudiar.", "Estudia en un lugar tranquilo y descansa cinco minutos cada media hora."),
        ("¿Qué es un planeta?", "Un planeta es un cuerpo grande que gira alrededor de una estrella."),
        ("¿Quién pintó el Guernica?", "Pablo Picasso pintó el Guernica en el año mil novecientos treinta y siete."),
    ],
    "ru": [
        ("Какая самая длинная река в России?", "Самой длинной рекой считается Лена или Обь с Иртышом."),
        ("Почему небо голубое?", "Солнечный свет рассеивается в воздухе, и синий цвет рассеивается сильнее всего."),
        ("Как приготовить чай?", "Вскипятите воду, залейте заварку и подождите три или четыре минуты."),
        ("Что такое вулкан?", "Вулкан это гора, из которой иногда выходит горячая лава."),
        ("Кто написал роман Война и мир?", "Роман Война и мир написал Лев Николаевич Толстой."),
        ("Зачем нужно читать книги?", "Книги развивают воображение, учат новым словам и помогают думать."),
    ],
    "zh": [
        ("中国的首都是哪里？", "中国的首都是北京，它是一座历史悠久的城市。"),
        ("为什么要多喝水？", "身体需要水来调节体温，运送营养，并排出废物。"),
        ("怎么做西红柿炒鸡蛋？", "先把鸡蛋炒熟盛出，再炒西红柿，最后把鸡蛋放回去一起翻炒。"),
        ("猫喜欢吃什么？", "猫喜欢吃鱼和肉，也需要每天喝干净的水。"),
        ("如何学好数学？", "每天做一些练习，遇到不懂的问题要及时问老师。"),
        ("什么是彩虹？", "彩虹是阳光穿过雨滴时出现的一道彩色弧线。"),
    ],
    "it": [
        ("Qual è il piatto più famoso di Napoli?", "Il piatto più famoso di Napoli è la pizza margherita."),
        (
            "Perché le foglie cadono in autunno?",
            "Gli alberi perdono le foglie per risparmiare acqua durante l'inverno.",
        ),
        ("Come posso imparare a nuotare?", "Inizia in acqua bassa con un istruttore e fai pratica ogni settimana."),
        ("Chi ha scritto la Divina Commedia?", "La Divina Commedia è stata scritta da Dante Alighieri."),
        ("Che cos'è un vulcano?", "Un vulcano è una montagna da cui esce roccia fusa molto calda."),
        ("Dammi un consiglio per dormire meglio.", "Vai a letto sempre alla stessa ora e spegni il telefono prima."),
    ],
    "ja": [
        ("日本で一番高い山は何ですか？", "日本で一番高い山は富士山で、高さは約三千七百メートルです。"),
        ("なぜ空は青いのですか？", "太陽の光が空気で散らばり、青い光が一番よく散らばるからです。"),
        ("おいしいお茶の入れ方を教えてください。", "お湯を少し冷ましてから茶葉に注ぎ、一分ほど待ちます。"),
        ("猫は何を食べますか？", "猫は主に肉や魚を食べ、新鮮な水も必要です。"),
        ("勉強を続けるコツは何ですか？", "毎日少しずつ同じ時間に勉強することが大切です。"),
        ("虹はどうしてできますか？", "太陽の光が雨粒の中で曲がって、色に分かれるからです。"),
    ],
    "pt": [
        ("Qual é a maior cidade do Brasil?", "A maior cidade do Brasil é São Paulo, com milhões de habitantes."),
        ("Por que devemos comer frutas?", "As frutas têm vitaminas e fibras que ajudam o corpo a funcionar bem."),
        ("Como se faz um bolo simples?", "Misture farinha, açúcar, ovos e leite, e asse a massa por meia hora."),
        ("O que é uma floresta tropical?", "É uma floresta quente e úmida, com muitas árvores e animais diferentes."),
        (
            "Quem descobriu o caminho marítimo para a Índia?",
            "Vasco da Gama chegou à Índia por mar no ano de mil quatrocentos e noventa e oito.",
        ),
        (
            "Dê uma dica para economizar energia.",
            "Desligue as luzes quando sair de um quarto e use lâmpadas econômicas.",
        ),
    ],
}


def _row(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def shuffled(text: str, rng: random.Random) -> str:
    """The same words in a random order (a different order than the original)."""
    words = text.split()
    while True:
        order = words[:]
        rng.shuffle(order)
        if order != words:
            return " ".join(order)


def mixed_rows(seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    """(rows, kind per row index as a string: "en" | "shuffled" | a language code), in a shuffled order."""
    rng = random.Random(seed)
    rows = [(_row(q, a), "en") for q, a in ENGLISH]
    rows += [(_row(q, a), lang) for lang, pairs in OTHER.items() for q, a in pairs]
    rows += [(_row(shuffled(q, rng), shuffled(a, rng)), "shuffled") for q, a in ENGLISH[::2]]
    rng.shuffle(rows)
    return [r for r, _ in rows], {str(i): kind for i, (_, kind) in enumerate(rows)}
